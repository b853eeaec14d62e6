"""Analysis on TensorFlow and on JAX, side by side: the same small networks (identical weights, set from NumPy),
the same points; prints the relative differences of the slope, the Jacobian statistics and the certificates.

    python examples/analysis_backend_agreement.py            # runs both backends (one subprocess each)
    python examples/analysis_backend_agreement.py --json out.json   # also writes the numbers

On TensorFlow σ_max and the certificates are computed in float64; on JAX (without `jax_enable_x64`) in float32,
so differences of ~1e-6 relative are expected, and a certified radius found by bisection can differ by one final
bracket (2^(30/2^14) − 1 ≈ 0.13 % with the default 14 iterations) where an example sits at a bracket's edge.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

BACKENDS = ("tensorflow", "jax")


def _weights_like(model, seed):
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.get_weights():
        if w.ndim == 1:
            weights.append((0.1 * rng.normal(size=w.shape)).astype(np.float32))
        else:
            fan_in = int(np.prod(w.shape[:-1]))
            weights.append((rng.normal(size=w.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))
    return weights


def measure():
    """Every number, on the active Keras backend, as a dict of lists."""
    import keras

    import keras_wssi as kw
    from keras_wssi import analysis

    inputs = keras.Input((20,))
    h = keras.layers.Dense(32, activation="relu", name="hidden_0")(inputs)
    h = keras.layers.Dense(16, activation="relu", name="hidden_1")(h)
    mlp = keras.Model(inputs, keras.layers.Dense(5, name="logits")(h))
    mlp.set_weights(_weights_like(mlp, 0))
    cnn = kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(3,), dense_units=6, num_classes=4)
    cnn.set_weights(_weights_like(cnn, 1))

    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 20)).astype(np.float32)
    y = np.argmax(np.asarray(mlp(x)), axis=1)
    y[:6] = (y[:6] + 1) % 5  # a few misclassified examples (radius 0)
    images = rng.random((16, 8, 8, 1)).astype(np.float32)

    out = {
        "backend": keras.backend.backend(),
        "slope_exact": analysis.slope(mlp, x, method="exact", batch_size=24),
        "slope_jacobian": analysis.slope(mlp, x, method="jacobian"),
        "slope_cnn": analysis.slope(cnn, images),
        "input_jacobian": analysis.input_jacobian(mlp, x[:16]).reshape(-1),
        "layerwise_spectral_norms": list(analysis.layerwise_spectral_norms(mlp).values()),
    }
    report = analysis.jacobian_penalty_report(mlp, x[:32], y[:32], cure_h=0.1)
    out.update({f"report/{k}": [v] for k, v in report.items()})
    for mode in ("linear", "interval", "activation", "norm"):
        out[f"certified_radius/{mode}"] = analysis.certified_radius(mlp, x, y, epsilon=1.0, mode=mode, max_radius=1.0)
        margins = analysis.certified_margins(mlp, x, y, 0.01, mode=mode)
        out[f"certified_margin/{mode}"] = margins["certified_margin"]
    curve = analysis.certified_accuracy_curve(mlp, x, y, [0.0, 1e-3, 1e-2, 3e-2, 1e-1])
    out["certified_accuracy_curve"] = curve["certified_accuracy"]
    return {k: (v if isinstance(v, str) else [float(t) for t in np.asarray(v, np.float64).reshape(-1)]) for k, v in out.items()}


def _relative(a, b):
    """`(normwise, elementwise)`: max |a − b| / max |a|, and max |a − b| / max(|a|, |b|) per entry (large
    where an entry is near 0, e.g. a Jacobian entry or a margin at the edge)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        raise AssertionError("the backends disagree on which values are infinite")
    finite = np.isfinite(a)
    if not finite.any():
        return 0.0, 0.0
    a, b = a[finite], b[finite]
    difference = np.abs(a - b)
    scale = np.maximum(np.abs(a), np.abs(b))
    normwise = float(difference.max() / max(np.abs(a).max(), 1e-30))
    elementwise = float((difference / np.where(scale > 0, scale, 1.0)).max())
    return normwise, elementwise


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", help="internal: measure on the active backend and write JSON here")
    parser.add_argument("--json", help="write both backends' numbers and the differences here")
    args = parser.parse_args()
    if args.measure:
        with open(args.measure, "w") as f:
            json.dump(measure(), f)
        return
    results = {}
    for backend in BACKENDS:
        path = f"/tmp/analysis_backend_agreement_{backend}_{os.getpid()}.json"
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run([sys.executable, __file__, "--measure", path], env=env, check=True)
        with open(path) as f:
            results[backend] = json.load(f)
        os.remove(path)
    tf_numbers, jax_numbers = results["tensorflow"], results["jax"]
    differences = {}
    print(f"{'quantity':38s} {'n':>5s} {'normwise':>9s} {'per entry':>9s}  TF mean / JAX mean")
    for key in tf_numbers:
        if key == "backend":
            continue
        a, b = np.asarray(tf_numbers[key]), np.asarray(jax_numbers[key])
        differences[key] = _relative(a, b)
        finite = np.isfinite(a)
        normwise, elementwise = differences[key]
        print(f"{key:38s} {len(a):5d} {normwise:9.2g} {elementwise:9.2g}  {a[finite].mean():.7g} / {b[finite].mean():.7g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"numbers": results, "relative_difference_normwise_elementwise": differences}, f, indent=1)


if __name__ == "__main__":
    main()
