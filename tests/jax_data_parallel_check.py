"""One process of the JAX scale-out test: trains a keras_wssi.Model through `fit` under `keras.distribution`.

Usage: `jax_data_parallel_check.py OUT_PREFIX PENALTY[,PENALTY...] [--process=I --port=P]`; writes
`OUT_PREFIX<index>.npz` per penalty (one model each, trained in turn in the same processes). With `--process`, this is one of two
processes on 127.0.0.1 (`keras.distribution.initialize`, CPU collectives): the global batch of 32 is sharded
over the two processes' devices by `keras.distribution.DataParallel`, each process feeding its own half of the
data (process i holds examples i*N/2 … (i+1)*N/2). Without it, one process trains on the same global batches
(batch k = the k-th 16 examples of each half, concatenated) on one device. Writes the weights, the penalty state
and the history.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def build_model():
    """The seeded model both runs start from: a small CNN with a Dense head."""
    import keras

    import keras_wssi as kw

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="tanh")(h)
    return kw.Model(inputs, keras.layers.Dense(10)(h))


def main(argv):
    prefix, penalties = argv[1], argv[2].split(",")
    options = dict(a[2:].split("=", 1) for a in argv[3:])
    import keras

    if "process" in options:
        keras.distribution.initialize(f"127.0.0.1:{options['port']}", num_processes=2, process_id=int(options["process"]))
    import jax

    rng = np.random.default_rng(0)
    n, local_batch, steps = 256, 16, 8
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)
    halves = [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
    if "process" in options:
        assert jax.process_count() == 2 and len(jax.devices()) == 2, (jax.process_count(), jax.devices())
        distribution = keras.distribution.DataParallel(devices=jax.devices())
        distribution.auto_shard_dataset = False  # Each process already holds its own half of the data.
        keras.distribution.set_distribution(distribution)
        x_fit, y_fit = halves[int(options["process"])]
        batch_size = local_batch
    else:
        # The same global batches: the k-th local batch of each process, concatenated.
        blocks = [np.concatenate([h[i][k * local_batch : (k + 1) * local_batch] for h in halves]) for k in range(n // 2 // local_batch) for i in (0, 1)]
        x_fit = np.concatenate(blocks[0::2])
        y_fit = np.concatenate(blocks[1::2])
        batch_size = 2 * local_batch

    for index, penalty in enumerate(penalties):
        model = build_model()
        model.compile(
            keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            regularizers=[] if penalty == "none" else [penalty], jit_compile=True,
        )
        history = model.fit(x_fit, y_fit, batch_size=batch_size, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
        arrays = {f"w{i}": np.asarray(v.value) for i, v in enumerate(model.trainable_variables)}
        arrays.update({f"s{i}": np.asarray(v.value) for i, v in enumerate(model.non_trainable_variables)})
        history = json.dumps({k: [float(v) for v in vs] for k, vs in history.history.items()})
        np.savez(f"{prefix}{index}.npz", history=history, **arrays)


if __name__ == "__main__":
    main(sys.argv)
