"""One worker of a two-process `MultiWorkerMirroredStrategy` run on localhost, or the one-process reference.

    python tests/multi_worker_check.py OUTPUT.npz PENALTY [--worker=i --ports=p0,p1] [--backup_dir=DIR] [--epochs=N]

With `--worker`, sets `TF_CONFIG` for a two-worker cluster on 127.0.0.1 and trains under
`MultiWorkerMirroredStrategy`; without it, trains the same model on one process with the same global batch.
Writes the final weights and the History to OUTPUT.npz. `tests/test_multi_worker.py` starts it.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 32
STEPS = 4
EPOCHS = 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("penalty")
    parser.add_argument("--worker", type=int, default=None)
    parser.add_argument("--ports", default="")
    parser.add_argument("--backup_dir", default="")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    if args.worker is not None:
        workers = [f"127.0.0.1:{p}" for p in args.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.worker}})

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_wssi as kw

    if args.worker is not None:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    x = rng.random((GLOBAL_BATCH * STEPS, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 10, GLOBAL_BATCH * STEPS).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = kw.architectures.mlp(input_shape=x.shape[1:], hidden_units=(16, 16))
        model.compile(
            keras.optimizers.SGD(0.05),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            regularizers=[args.penalty],
            jit_compile=False,  # XLA cannot compile across a strategy's devices (DESIGN.md §3).
        )
    callbacks = [kw.callbacks.TerminateOnNonFinite()]
    if args.backup_dir:
        callbacks.append(kw.callbacks.ResumableBackup(args.backup_dir, config={"penalty": args.penalty}))
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=args.epochs, shuffle=False, verbose=0, callbacks=callbacks)
    # The trained weights, and apart from them the other state the model tracks (penalty state).
    weights = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    state = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    np.savez(
        args.output,
        history=json.dumps({k: [float(v) for v in values] for k, values in history.history.items()}),
        **{f"w{i}": w for i, w in enumerate(weights)},
        **{f"s{i}": w for i, w in enumerate(state)},
    )


if __name__ == "__main__":
    main()
