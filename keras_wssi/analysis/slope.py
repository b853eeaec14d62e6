"""The slope of a network: per-example σ_max of the logit Jacobian and its distribution.

Johansson, Engsner, Strannegård, Mostad, "Slope and generalization properties of neural networks"
(arXiv 2107.01473). `slope(x) = σ_max(J(x))`, `J = ∂z/∂x` the Jacobian of the logits (no softmax). For a
ReLU MLP it is the spectral norm of the local affine map `W_L D_{L-1} W_{L-1} … D_1 W_1` (`D_l` the
activation masks at `x`); the object of study is its distribution over a fixed set of points.

- Dense chains with elementwise activations (`method="exact"`): the Jacobian is formed from the chain rule
  `W_L D_{L-1} … D_1 W_1` with `D_l = diag σ'(pre-activation)` (for ReLU MLPs: the local affine map).
- Other models (`method="jacobian"`): the full per-example Jacobian (`keras_wssi.linalg.per_example_jacobian`,
  one replicated forward and backward pass), then the largest singular value.

Ranking data sets by complexity trains reference networks, so it lives above analysis, in
`keras_wssi.experiments.dataset_complexity`.

Precision: the Jacobian is float32 (the model's own computation); its top singular value is then solved in
float64 on TensorFlow (and on JAX with `jax_enable_x64`). On JAX by default (no float64) that last step runs in
float32: the slope is then accurate to about 1e-6 relative instead of float64 round-off (the Jacobian's float32
error dominates either way).
"""

import numpy as np
from keras import ops

from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi import validation
from keras_wssi.analysis._compute import compiled
from keras_wssi.analysis._compute import precise_dtype
from keras_wssi.structure import dense_chain

__all__ = [
    "METHODS",
    "local_jacobian",
    "slope",
    "slope_distribution",
    "spectral_norm_from_jacobian",
]

METHODS = ("auto", "exact", "jacobian")
# 2^20 power steps in `top_eigenvector`: exact to the dtype's round-off unless the top two singular values agree
# to ~1e-6.
_SQUARINGS = 20


def local_jacobian(chain, x):
    """The per-example logit Jacobian `(B, C, d)` of a Dense chain (see `keras_wssi.structure.dense_chain`), by the
    chain rule (`keras_wssi.linalg.dense_chain_jacobian`). Differentiable in the kernels. For ReLU layers `σ'` is
    the 0/1 mask (the local affine map)."""
    return linalg.dense_chain_jacobian(chain.kernels, [layer.bias for layer in chain.layers], chain.activations, x)


def spectral_norm_from_jacobian(jacobian):
    """`σ_max` of each `(C, d)` Jacobian in a batch (float64 NumPy; `keras_wssi.linalg.spectral_norm_squared`, solved
    in float64, or float32 on JAX without `jax_enable_x64`)."""
    jacobian = ops.convert_to_tensor(np.asarray(jacobian, precise_dtype()))
    _, sigma_squared = linalg.spectral_norm_squared(jacobian, squarings=_SQUARINGS)
    return np.sqrt(np.maximum(np.asarray(ops.convert_to_numpy(sigma_squared), np.float64), 0.0))


def _per_example_jacobian(model, x):
    return linalg.per_example_jacobian(lambda t: ops.cast(model(t, training=False), "float32"), x)


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

    On TensorFlow the top singular value is solved in float64; on JAX without `jax_enable_x64` in float32
    (about 1e-6 relative; see the module docstring).

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
    batch_size = validation.positive_int(batch_size, "batch_size")

    dtype = precise_dtype()

    def sigma_squared_batch(xb):
        jacobian = local_jacobian(chain, xb) if method == "exact" else _per_example_jacobian(model, xb)
        # float64 from the Jacobian on: the analysis reports σ_max to float64 accuracy (float32 on JAX without x64).
        _, sigma_squared = linalg.spectral_norm_squared(ops.cast(jacobian, dtype), squarings=_SQUARINGS)
        return sigma_squared

    # The current weights are read on every call (on JAX anything else would be a constant of the trace).
    sigma_squared_batch = compiled(sigma_squared_batch, model.variables)
    values = []
    for start in range(0, len(x), batch_size):
        batch = ops.convert_to_tensor(np.asarray(x[start : start + batch_size], np.float32))
        sigma_squared = np.asarray(ops.convert_to_numpy(sigma_squared_batch(batch)), np.float64)
        values.append(np.sqrt(np.maximum(sigma_squared, 0.0)))
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
