"""Trains with every registered penalty on one device and under MirroredStrategy on two virtual CPUs.

Run as a script (it must configure the logical devices before TensorFlow starts):

    python tests/distributed_training_check.py [penalty_name …]

Prints one JSON line per penalty: the largest weight difference and metric difference between the
single-device run and the two-replica run after three SGD steps on the same global batches.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wssi as kw  # noqa: E402


def _penalty(name):
    cls, defaults = kw.penalties.registered_penalties()[name]
    try:
        return cls(**{**defaults, "strength": 0.05})
    except ValueError:  # Monitors (strength fixed at 0) only log.
        return cls(**defaults)


def _run(strategy, name, x, y):
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = kw.architectures.mlp(input_shape=x.shape[1:], hidden_units=(16, 16))
        model.compile(
            keras.optimizers.SGD(0.05),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            regularizers=[_penalty(name)],
            jit_compile=False,  # XLA cannot compile across a MirroredStrategy's devices (DESIGN.md §3).
        )
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    # Trainable weights: penalty state (e.g. warm-start vectors, updated from replica 0) is compared through them.
    return [v.numpy() for v in model.trainable_variables], history.history


def main(names):
    rng = np.random.default_rng(0)
    x = rng.random((32, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int32")
    names = names or sorted(kw.penalties.registered_penalties())
    for name in names:
        single, single_history = _run(tf.distribute.OneDeviceStrategy("/cpu:0"), name, x, y)
        mirrored, mirrored_history = _run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), name, x, y)
        weight_difference = max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored))
        metric_difference = max(
            float(np.max(np.abs(np.subtract(single_history[k], mirrored_history[k])) / (1e-6 + np.abs(single_history[k]))))
            for k in single_history
        )
        finite = all(np.all(np.isfinite(w)) for w in mirrored)
        print(json.dumps({"penalty": name, "max_weight_difference": weight_difference,
                          "max_relative_metric_difference": metric_difference, "finite": finite}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
