"""One side of the TensorFlow-vs-JAX parity test: every registered penalty on fixed weights and one fixed batch.

Usage: `KERAS_BACKEND=jax|tensorflow backend_parity_check.py OUT.json`. For each registered penalty and each of
two models (an MLP and a small CNN, weights drawn by NumPy from a fixed seed, the same on both backends), it
compiles a `keras_wssi.Model` with SGD(learning rate 1) and that penalty (strength 1, plus the cross-entropy),
and takes one `train_on_batch` step: the logged penalty value is the value at the starting weights, and the weight
change is minus the gradient of the step's loss. Random draws (the penalties' random projections) are replaced by
one fixed NumPy draw per shape, and the penalties' state variables are set from NumPy too, so both backends
compute the same mathematical quantity. A penalty that refuses a model is recorded with its error type (both
backends must refuse the same ones).
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wssi as kw  # noqa: E402
from keras_wssi import backend  # noqa: E402

BATCH = 8


POOL = np.random.default_rng(12345).standard_normal(2**20).astype(np.float32)


def fixed_normal(shape, seed):
    """The same draws on both backends: the first entries of one NumPy pool, reshaped (the backend's seed and
    counter are ignored; the batch dimension may be symbolic on TensorFlow)."""
    del seed
    if isinstance(shape, (list, tuple)) and all(isinstance(s, (int, np.integer)) for s in shape):
        return keras.ops.convert_to_tensor(POOL[: int(np.prod(shape))].reshape(tuple(shape)))
    shape = keras.ops.cast(keras.ops.convert_to_tensor(shape if hasattr(shape, "dtype") else list(shape)), "int32")
    flat = keras.ops.slice(keras.ops.convert_to_tensor(POOL), [0], [keras.ops.prod(shape)])
    return keras.ops.reshape(flat, shape)


def build(kind):
    if kind == "mlp":
        inputs = keras.Input((6, 6, 1))
        h = keras.layers.Flatten()(inputs)
        h = keras.layers.Dense(16, activation="relu")(h)
        h = keras.layers.Dense(12, activation="tanh")(h)
    else:
        inputs = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(12, activation="tanh")(h)
    return kw.Model(inputs, keras.layers.Dense(10)(h))


def main(out):
    backend.stateless_normal = fixed_normal
    generator = np.random.default_rng(0)
    x = generator.random((BATCH, 6, 6, 1), dtype=np.float32)
    y = generator.integers(0, 10, BATCH)
    results = {}
    for name, (cls, defaults) in sorted(kw.penalties.registered_penalties().items()):
        for kind in ("mlp", "cnn"):
            model = build(kind)
            weights = [np.random.default_rng(i + 1).normal(0, 0.4, w.shape).astype(np.float32) for i, w in enumerate(model.get_weights())]
            model.set_weights(weights)
            arguments = dict(defaults)
            if name != "jacobian_spectral_norm_error":  # a monitor: its strength stays 0
                arguments["strength"] = 1.0
            if "seed" in cls.__init__.__code__.co_varnames:
                arguments["seed"] = 1
            try:
                penalty = cls(**arguments)
                model.compile(keras.optimizers.SGD(1.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              regularizers=[penalty], jit_compile=True)
            except (ValueError, TypeError) as error:
                results[f"{name}/{kind}"] = {"refused": type(error).__name__}
                continue
            for index, variable in enumerate(penalty.variables):
                if variable.path.endswith(("strength", "seed")):
                    continue
                value = np.random.default_rng(100 + index).standard_normal(variable.shape).astype(np.float32)
                variable.assign(value / max(np.linalg.norm(value), 1e-6) if value.ndim == 1 else value)
            try:
                logs = model.train_on_batch(x, y, return_dict=True)
            except (ValueError, TypeError) as error:
                results[f"{name}/{kind}"] = {"refused": type(error).__name__, "message": str(error)[:300]}
                continue
            step = [np.asarray(w) - np.asarray(v.value) for w, v in zip(weights, model.trainable_variables)]
            results[f"{name}/{kind}"] = {
                "value": float(logs[penalty.name]),
                "gradient": np.concatenate([s.ravel() for s in step]).astype(float).tolist(),
            }
    with open(out, "w") as f:
        json.dump({"backend": backend.BACKEND, "results": results}, f)


if __name__ == "__main__":
    main(sys.argv[1])
