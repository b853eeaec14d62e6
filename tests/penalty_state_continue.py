"""Helper of tests/test_penalty_state.py, run in a fresh Python process.

    python tests/penalty_state_continue.py MANIFEST.json

For every entry of the manifest: load the saved model (`.keras` file, or a fresh model + `load_weights` for a
weights checkpoint), train the remaining steps on the same batches, and write the final variables to an `.npz`.
First it checks that `keras.models.load_model` without `import keras_wssi` fails with an error that says so.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main(manifest_path):
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    try:
        keras.models.load_model(manifest["entries"][0]["keras_path"])
        hint = "loaded without importing keras_wssi"
    except Exception as error:  # noqa: BLE001 - the message is the point
        hint = str(error)
    with open(manifest["hint_path"], "w") as handle:
        handle.write(hint)

    sys.path.insert(0, manifest["repo_root"])
    import keras_wssi as kw
    from test_penalty_state import batches
    from test_penalty_state import build_model

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    for entry in manifest["entries"]:
        keras.utils.set_random_seed(entry["seed"])
        if entry["kind"] == "keras":
            model = keras.models.load_model(entry["keras_path"])
        else:
            model = build_model(entry["penalty"], jit_compile=entry["jit_compile"], optimizer=entry["optimizer"])
            model.load_weights(entry["weights_path"])
        assert isinstance(model, kw.Model), type(model)
        for x, y in batches(entry["seed"])[entry["steps_done"] :]:
            model.train_on_batch(x, y)
        np.savez(entry["result_path"], *[v.numpy() for v in model.variables])


if __name__ == "__main__":
    main(sys.argv[1])
