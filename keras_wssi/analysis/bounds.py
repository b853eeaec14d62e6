"""The input-gradient bound `||J||_2 ≤ ∏ ||W_l||` next to the measured per-example `||J(x)||_2`.

For a piecewise-linear network the logit Jacobian is `J = W_L D_{L−1} … D_1 W_1` with ReLU/max-pool
masks `D` of norm ≤ 1, so `||J||_2 ≤ ∏ ||W_l||_2 ≤ ∏ ||W_l||_F` (Liu et al., arXiv 2008.02965). A
convolution's operator norm is at most `sqrt(k_h k_w)` times the norm of its reshaped kernel matrix.
The bound here is propagated through the model's graph as a Lipschitz bound of every tensor with
respect to the input: a weight layer multiplies it by its operator-norm bound, an `Add` sums its inputs'
bounds (so a residual block `h + g(h)` gives `(1 + ∏_{k∈g} ||W_k||)` times the bound of `h`), a
`Concatenate` takes the root of the sum of squares, and pooling/upsampling multiply by the square root of
how many outputs can read one input.
"""

import math

import keras
import numpy as np

from keras_wssi import structure
from keras_wssi.analysis.slope import slope

__all__ = ["input_gradient_bound", "input_jacobian_spectral_norms", "layer_operator_norm_bounds"]

L = keras.layers
BOUND_NORMS = ("spectral", "frobenius")


def _matrices(kernel, kind):
    kernel = np.asarray(kernel, dtype=np.float64)
    if kind == "depthwise_conv":
        spatial = int(np.prod(kernel.shape[:-2]))
        return np.transpose(kernel.reshape(spatial, kernel.shape[-2], kernel.shape[-1]), (1, 0, 2))
    return kernel.reshape(1, -1, kernel.shape[-1])


def _kernel_bound(kernel, kind, receptive_field, norm):
    matrices = _matrices(kernel, kind)
    if norm == "spectral":
        value = max(float(np.linalg.norm(m, ord=2)) for m in matrices)
    else:
        value = float(np.linalg.norm(np.asarray(kernel, dtype=np.float64)))
    return math.sqrt(receptive_field) * value


def layer_operator_norm_bounds(model, norm="spectral"):
    """`{layer_name: upper bound of the layer's linear map's operator norm}` for every weight layer.

    `norm="spectral"` uses the exact spectral norm of the (reshaped) kernel matrix (SVD), `"frobenius"`
    its Frobenius norm; convolutions get the `sqrt(∏ kernel_size)` factor, separable convolutions the
    product of their depthwise and pointwise bounds.
    """
    if norm not in BOUND_NORMS:
        raise ValueError(f"norm must be one of {BOUND_NORMS}, got {norm!r}.")
    bounds = {}
    for weight_layer in structure.weight_layers(model):
        if weight_layer.kind == "separable_conv":
            depthwise, pointwise = weight_layer.kernels
            value = _kernel_bound(depthwise.numpy(), "depthwise_conv", weight_layer.receptive_field, norm)
            value *= _kernel_bound(pointwise.numpy(), "dense", 1, norm)
        else:
            value = _kernel_bound(weight_layer.kernels[0].numpy(), weight_layer.kind, weight_layer.receptive_field, norm)
        bounds[weight_layer.name] = value
    return bounds


def _window_overlap(layer):
    """How many outputs of a pooling/upsampling layer can read one input (per spatial axis product)."""
    if isinstance(layer, (L.UpSampling1D, L.UpSampling2D, L.UpSampling3D)):
        size = layer.size if isinstance(layer.size, (tuple, list)) else (layer.size,)
        return int(np.prod(size))
    pool = layer.pool_size if isinstance(layer.pool_size, (tuple, list)) else (layer.pool_size,)
    strides = layer.strides if isinstance(layer.strides, (tuple, list)) else (layer.strides,)
    return int(np.prod([math.ceil(p / s) for p, s in zip(pool, strides)]))


def _layer_factor(layer):
    """Lipschitz factor of a non-weight layer (its own input-to-output operator norm bound)."""
    if isinstance(layer, (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)):
        return math.sqrt(_window_overlap(layer))
    if isinstance(layer, (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)):
        # Each output averages `∏ pool` inputs; an input feeds ∏ ceil(pool/stride) outputs.
        pool = layer.pool_size if isinstance(layer.pool_size, (tuple, list)) else (layer.pool_size,)
        return math.sqrt(_window_overlap(layer) / float(np.prod(pool)))
    if isinstance(layer, (L.UpSampling1D, L.UpSampling2D, L.UpSampling3D)):
        return math.sqrt(_window_overlap(layer))
    if isinstance(layer, L.LeakyReLU):
        return max(1.0, abs(float(layer.negative_slope)))
    if isinstance(layer, L.ReLU):
        return max(1.0, abs(float(layer.negative_slope)))
    return 1.0


def input_gradient_bound(model, norm="spectral"):
    """Upper bound of `||J(x)||_2` over all inputs, propagated through the graph (see module docstring).

    Args:
        model: a functional or Sequential model with piecewise-linear activations.
        norm: `"spectral"` (tighter, `∏ ||W||_2`) or `"frobenius"` (`∏ ||W||_F`).

    Returns:
        A float.

    Raises:
        StructureError: non-homogeneous layers (sigmoid, tanh, normalization…) inside the network.
    """
    structure.check_homogeneous(model, method="input_gradient_bound", error=True)
    layer_bounds = layer_operator_norm_bounds(model, norm=norm)
    nodes = structure.graph_nodes(model)
    bound_of = {}
    for node in nodes:
        parents = [bound_of[id(p)] for p in node.parents]
        if not parents:
            value = 1.0
        elif isinstance(node.layer, L.Add):
            value = sum(parents)
        elif isinstance(node.layer, L.Concatenate):
            value = math.sqrt(sum(b * b for b in parents))
        else:
            value = parents[0]
        if structure.is_weight_layer(node.layer):
            value *= layer_bounds[node.layer.name]
        value *= _layer_factor(node.layer)
        bound_of[id(node)] = value
    outputs = [bound_of[id(n)] for n in nodes if not n.children]
    return float(max(outputs))


def input_jacobian_spectral_norms(model, x, batch_size=256):
    """Measured per-example `||J(x_i)||_2` (largest singular value of the logit Jacobian), in inference mode.

    Computed exactly by `keras_wssi.analysis.slope` (the local affine map of a ReLU MLP, or the full
    per-example Jacobian otherwise, then the top eigenvalue of `J Jᵀ`). Returns a NumPy array `(N,)`.
    """
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"x must be a numeric array of inputs, got {type(x).__name__}.") from None
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of inputs, got shape {x.shape}.")
    expected = getattr(structure.unwrap(model), "input_shape", None)
    if isinstance(expected, tuple) and len(expected) == x.ndim and any(
        e is not None and e != s for e, s in zip(expected[1:], x.shape[1:])
    ):
        raise ValueError(f"x has example shape {x.shape[1:]}, but the model expects {expected[1:]}.")
    # The same quantity as the slope of Johansson et al.: one implementation serves both names.
    return slope(model, x, batch_size=batch_size)
