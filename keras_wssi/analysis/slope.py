"""The slope of a network: per-example σ_max of the logit Jacobian, its distribution, and data-set complexity.

Johansson, Engsner, Strannegård, Mostad, "Slope and generalization properties of neural networks"
(arXiv 2107.01473). `slope(x) = σ_max(J(x))`, `J = ∂z/∂x` the Jacobian of the logits (no softmax). For a
ReLU MLP it is the spectral norm of the local affine map `W_L D_{L-1} W_{L-1} … D_1 W_1` (`D_l` the
activation masks at `x`); the object of study is its distribution over a fixed set of points.

- Dense chains with elementwise activations (`method="exact"`): the Jacobian is formed from the chain rule
  `W_L D_{L-1} … D_1 W_1` with `D_l = diag σ'(pre-activation)` (for ReLU MLPs: the local affine map).
- Other models (`method="jacobian"`): the full per-example Jacobian (`keras_wssi.linalg.per_example_jacobian`,
  one replicated forward and backward pass), then the largest singular value.
"""

import numpy as np
import tensorflow as tf

from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi.structure import dense_chain

__all__ = [
    "METHODS",
    "dataset_complexity",
    "local_jacobian",
    "slope",
    "slope_distribution",
    "spectral_norm_from_jacobian",
    "top_singular_value_squared",
]

METHODS = ("auto", "exact", "jacobian")


def local_jacobian(chain, x):
    """The per-example logit Jacobian `(B, C, d)` of a Dense chain (see `dense_chain`), by the chain rule.

    Differentiable in the kernels. For ReLU layers `σ'` is the 0/1 mask (the local affine map).
    """
    h = tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])
    derivatives = []
    for index, layer in enumerate(chain.layers):
        pre = tf.matmul(h, tf.cast(layer.kernel, tf.float32))
        if layer.bias is not None:
            pre = pre + tf.cast(layer.bias, tf.float32)
        if index == len(chain.layers) - 1:
            break
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(pre)
            h = pre
            for fn in chain.activations[index]:
                h = tf.cast(fn(h), tf.float32)
        # Elementwise activations: the gradient of Σ σ(pre) is σ'(pre), the diagonal of D_l.
        derivatives.append(tf.stop_gradient(tape.gradient(h, pre, unconnected_gradients="zero")))
    kernels = [tf.cast(k, tf.float32) for k in chain.kernels]
    jacobian = tf.transpose(kernels[-1])[None]  # (1, C, n_{L-1})
    for kernel, derivative in zip(reversed(kernels[:-1]), reversed(derivatives)):
        jacobian = tf.einsum("bcn,mn->bcm", jacobian * derivative[:, None, :], kernel)
    if len(kernels) == 1:
        jacobian = tf.tile(jacobian, [tf.shape(h)[0], 1, 1])
    return jacobian


def top_singular_value_squared(jacobian):
    """`σ_max(J)²` per example with the envelope-theorem gradient: the top eigenvector `v` of `J Jᵀ` (C×C) is
    held constant and `||vᵀ J||²` is returned (differentiable in `J`)."""
    flat = tf.reshape(jacobian, [tf.shape(jacobian)[0], tf.shape(jacobian)[1], -1])
    gram = tf.matmul(flat, flat, transpose_b=True)
    _, vectors = tf.linalg.eigh(tf.stop_gradient(gram))
    v = tf.stop_gradient(vectors[..., -1])
    return tf.reduce_sum(tf.square(tf.einsum("bc,bcd->bd", v, flat)), axis=-1)


def spectral_norm_from_jacobian(jacobian):
    """`σ_max` of each `(C, d)` Jacobian in a batch (NumPy float64, via the C×C Gram matrix)."""
    flat = np.asarray(jacobian, np.float64).reshape(len(jacobian), jacobian.shape[1], -1)
    gram = flat @ np.transpose(flat, (0, 2, 1))
    return np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[:, -1], 0.0))


def _per_example_jacobian(model, x):
    return linalg.per_example_jacobian(lambda t: tf.cast(model(t, training=False), tf.float32), x)


def _resolve_method(model, method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "jacobian":
        return "jacobian", None
    try:
        chain = dense_chain(model, method="The exact slope")
    except structure.StructureError:
        if method == "exact":
            raise
        return "jacobian", None
    return "exact", chain


def slope(model, x, batch_size=256, method="auto"):
    """Per-example slope `σ_max(∂logits/∂x)` (Johansson et al. 2021) as a NumPy array `(N,)`.

    Args:
        model: a Keras model mapping inputs to logits (inference mode is used).
        x: inputs `(N, …)`, floating point.
        batch_size: examples per compiled batch.
        method: `"exact"` (Dense chains with elementwise activations; for ReLU MLPs the local affine map),
            `"jacobian"` (full per-example Jacobian of any model) or `"auto"` (exact when it applies).

    Example:

    ```python
    values = keras_wssi.analysis.slope(model, x_train[:750])
    ```
    """
    method, chain = _resolve_method(model, method)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be floating point (the slope differentiates with respect to it), got {x.dtype}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

    @tf.function(reduce_retracing=True)
    def gram_batch(xb):
        jacobian = local_jacobian(chain, xb) if method == "exact" else _per_example_jacobian(model, xb)
        flat = tf.reshape(jacobian, [tf.shape(jacobian)[0], tf.shape(jacobian)[1], -1])
        return tf.matmul(flat, flat, transpose_b=True)

    values = []
    for start in range(0, len(x), batch_size):
        gram = gram_batch(tf.convert_to_tensor(x[start : start + batch_size], tf.float32)).numpy().astype(np.float64)
        values.append(np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[:, -1], 0.0)))
    return np.concatenate(values) if values else np.zeros([0])


def slope_distribution(model, x, quantiles=(0.1, 0.25, 0.5, 0.75, 0.9), bins=30, batch_size=256, method="auto"):
    """Summary of the slope over a fixed set of points: mean, std, quantiles and a histogram.

    Returns:
        A dict: `values` (N,), `mean`, `std`, `quantiles` ({q: value}), `histogram` (counts) and
        `bin_edges`.
    """
    for q in quantiles:
        if not 0.0 <= float(q) <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1], got {q!r}.")
    values = slope(model, x, batch_size=batch_size, method=method)
    counts, edges = np.histogram(values, bins=bins)
    return {
        "values": values,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": {float(q): float(np.quantile(values, q)) for q in quantiles},
        "histogram": counts,
        "bin_edges": edges,
    }


def dataset_complexity(
    datasets=("mnist", "fashion_mnist"),
    data_dir=None,
    hidden_units=(100,),
    epochs=3,
    num_train=10000,
    num_points=750,
    batch_size=128,
    learning_rate=1e-3,
    seed=0,
    model_fn=None,
):
    """Ranks data sets by the slope of a reference network trained on each (Johansson et al. 2021, §5).

    For every data set the same reference network (a ReLU MLP `hidden_units`, or `model_fn(input_shape,
    num_classes)`) is trained with Adam on the first `num_train` training images; the slope is measured
    on `num_points` fixed training points. A larger slope means a more complex (harder) data set.

    Returns:
        A list of dicts sorted by median slope (least complex first): `dataset`, `median`, `mean`,
        `quantiles` (0.1, 0.9), `test_accuracy`.
    """
    import keras

    from keras_wssi import architectures
    from keras_wssi import data

    results = []
    for name in datasets:
        keras.utils.set_random_seed(seed)
        x_train, y_train = data.load_arrays(name, "train", data_dir=data_dir)
        x_test, y_test = data.load_arrays(name, "test", data_dir=data_dir)
        x_train, y_train = x_train[:num_train], y_train[:num_train]
        if model_fn is None:
            model = architectures.mlp(input_shape=x_train.shape[1:], hidden_units=tuple(hidden_units))
        else:
            model = model_fn(x_train.shape[1:], 10)
        model.compile(
            keras.optimizers.Adam(learning_rate),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0)
        accuracy = float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])
        distribution = slope_distribution(model, x_train[:num_points], quantiles=(0.1, 0.5, 0.9))
        results.append(
            {
                "dataset": name,
                "median": distribution["quantiles"][0.5],
                "mean": distribution["mean"],
                "quantiles": {0.1: distribution["quantiles"][0.1], 0.9: distribution["quantiles"][0.9]},
                "test_accuracy": accuracy,
            }
        )
    return sorted(results, key=lambda r: r["median"])
