"""Margin bounds under norm-bounded weight perturbations: the tensor math behind the certificate and the loss.

Tsai, Hsu, Yu, Chen, "Formalizing Generalization and Robustness of Neural Networks to Weight
Perturbations" (arXiv 2103.02200). A network read by `keras_wssi.structure` (`dense_chain` or
`feedforward_chain`) has its kernels perturbed, `Ŵ_l = W_l + Δ_l` with `||Δ_l|| ≤ ε_l` (an operator norm of
`W_l` = the Keras kernel, reshaped to `(fan_in, fan_out)`, transposed). This module bounds, per example, the
worst case over that set of every pairwise margin `m_{y,i} = z_y − z_i`, in four modes
(docs/weight_perturbation_and_slope.md §1 states and proves them):

- `"norm"`: the paper's data-independent chain of operator norms (DESIGN.md §1.4, with biases).
- `"activation"`: the same chain with the example's actual hidden-activation norms.
- `"interval"`: sound element-wise bounds of every activation (a box), propagated layer by layer: for one
  example `{Δ h : ||Δ|| ≤ ε}` is exactly `{u : ||u||_p ≤ ε ||h||_p}`, so each pre-activation moves by at most
  `ε max_{h ∈ box} ||h||_p` plus the spread of the box through `|W|`; the last layer bounds each margin
  directly from the row difference `W_L[y] − W_L[i]`. Intersected with the `"activation"` ball.
- `"linear"` (CROWN-style): linear lower bounds of each margin as a function of every hidden layer, built
  backwards from the logits through the monotone activations' linear relaxations on their boxes; each
  perturbation `Δ_l` contributes `−ε_l · (dual norm of the backward coefficients at layer l) · max ||h||_p`
  (for convolutions, the dual operator norm of the correlation of the coefficients with the input patches).

Every bound returned is the minimum of the sound bounds computed for it, so `"interval"` is never looser
than `"activation"` and `"norm"`, and `"linear"` is never looser than `"interval"`.

Only numpy/keras, `keras_wssi.backend` and `keras_wssi.structure` are imported: `keras_wssi.analysis` (the public
certificate) and `keras_wssi.penalties` (the training loss) both build on this module.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi import labels as labels_module
from keras_wssi import structure

__all__ = [
    "MODES",
    "NORMS",
    "activation_norm_bounds",
    "bound_margins",
    "compute_dtype",
    "dual_norm",
    "labels_vector",
    "layer_radii",
    "margins",
    "operator_norm",
    "pair_constant",
    "perturbed_class_complexity",
    "validate_epsilon",
    "validate_layers",
    "validate_mode",
    "validate_weight_norm",
    "vector_norm",
]

L = keras.layers

# Canonical operator-norm names: the vector norm p whose induced operator norm bounds ||Δ_l||.
NORMS = ("inf", "1", "2")
MODES = ("linear", "interval", "activation", "norm")
_NORM_ALIASES = {
    "inf": "inf", "linf": "inf", "infinity": "inf", "max_row_l1": "inf",
    "1": "1", "l1": "1", "max_column_l1": "1",
    "2": "2", "l2": "2", "spectral": "2",
}
_DUAL = {"inf": "1", "1": "inf", "2": "2"}
# Largest backward-coefficient tensor (elements) built at once when refining hidden boxes.
_REFINE_ELEMENTS = 2 * 10**7


def validate_weight_norm(norm, argument="norm"):
    """Returns `"inf"`, `"1"` or `"2"` for the accepted spellings (also `np.inf`, 1, 2, `"spectral"`)."""
    if isinstance(norm, bool):
        raise TypeError(f"{argument} must be one of 'inf', '1', '2' (operator norms), got {norm!r}.")
    if isinstance(norm, (int, float)):
        key = "inf" if math.isinf(norm) else ("1" if norm == 1 else ("2" if norm == 2 else None))
    elif isinstance(norm, str):
        key = _NORM_ALIASES.get(norm.lower())
    else:
        key = None
    if key is None:
        raise ValueError(
            f"{argument} must be an operator norm: 'inf' (max-row-ℓ1, the paper's), '1' (max-column-ℓ1) or '2' "
            f"(spectral), got {norm!r}."
        )
    return key


def validate_epsilon(epsilon, argument="epsilon"):
    """A finite non-negative float (raises a clear error otherwise)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)):
        raise TypeError(f"{argument} must be a finite non-negative number, got {epsilon!r}.")
    epsilon = float(epsilon)
    if not math.isfinite(epsilon) or epsilon < 0.0:
        raise ValueError(f"{argument} must be a finite non-negative number (a norm radius), got {epsilon!r}.")
    return epsilon


def validate_mode(mode, allowed=MODES, argument="mode"):
    """`mode` if it is one of `allowed`, else a ValueError naming the choices."""
    if mode not in allowed:
        raise ValueError(f"{argument} must be one of {allowed}, got {mode!r}.")
    return mode


def validate_layers(layers, names, argument="layers"):
    """The set of chosen layer names (all when `layers` is None); unknown names raise a ValueError."""
    if layers is None:
        return set(names)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(f"{argument} names layers {unknown} that do not exist among the weight layers {names}.")
    if not layers:
        raise ValueError(f"{argument} must name at least one layer (or be None for all), got an empty list.")
    return set(layers)


def _matrix(kernel):
    kernel = ops.convert_to_tensor(kernel)
    return ops.reshape(kernel, (-1, kernel.shape[-1]))


def _is_tensor(value):
    return not isinstance(value, (int, float, np.floating, np.integer))


def compute_dtype(dtype):
    """The dtype name for `dtype` (a string or a framework dtype). float64 falls back to float32 where the backend
    lacks it (JAX without `jax_enable_x64`): the bounds are then computed, less conservatively, in float32."""
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype == "float64" and not backend.supports_float64():
        return "float32"
    return dtype


def operator_norm(kernel, norm="inf"):
    """The operator norm of the map `W = kernelᵀ` of a Dense kernel `(fan_in, fan_out)` (a convolution
    kernel is reshaped to `(k·k·C_in, C_out)`, the map applied to each patch).

    `"inf"`: max over outputs of the ℓ1 norm of the incoming weights (max-row-ℓ1 of W); `"1"`: max over
    inputs of the ℓ1 norm of the outgoing weights; `"2"`: the largest singular value (an SVD).
    """
    norm = validate_weight_norm(norm)
    kernel = _matrix(kernel)
    if not keras.backend.is_float_dtype(kernel.dtype):
        kernel = ops.cast(kernel, "float32")
    if norm == "inf":
        return ops.max(ops.sum(ops.abs(kernel), axis=0))
    if norm == "1":
        return ops.max(ops.sum(ops.abs(kernel), axis=1))
    return ops.svd(kernel, compute_uv=False)[0]


def vector_norm(v, norm):
    """`||v||_p` over the last axis, with p = ∞, 1 or 2 (the 2-norm guarded at 0 for its gradient)."""
    if norm == "inf":
        return ops.max(ops.abs(v), axis=-1)
    if norm == "1":
        return ops.sum(ops.abs(v), axis=-1)
    # Guarded: the gradient of sqrt at 0 is infinite (DESIGN.md §3); 1e-24 changes the value by ≤ 1e-12.
    return ops.sqrt(ops.sum(ops.square(v), axis=-1) + ops.convert_to_tensor(1e-24, v.dtype))


def dual_norm(v, norm):
    """`||v||_q` over the last axis, q the dual of p = `norm`."""
    return vector_norm(v, _DUAL[norm])


def pair_constant(norm):
    """`||e_y − e_i||_q`: 2 for p = ∞, 1 for p = 1, √2 for p = 2."""
    return {"inf": 2.0, "1": 1.0, "2": math.sqrt(2.0)}[norm]


def labels_vector(labels, num_classes):
    """Integer labels `(N,)` from integer or one-hot labels."""
    sparse, dense = labels_module.sparse_or_dense(labels, num_classes, "labels")
    return sparse if sparse is not None else ops.cast(ops.argmax(dense, axis=-1), "int32")


def margins(logits, labels):
    """`m_{y,i} = z_y − z_i` `(B, C)` (0 in column y)."""
    true = ops.take_along_axis(logits, ops.cast(ops.reshape(labels, (-1, 1)), "int32"), axis=1)
    return true - logits


def layer_radii(names, kernels, epsilon, layers=None, relative=False, norm="inf", argument="epsilon"):
    """Per weight layer, the radius ε_l (a Python float list; 0 for layers not perturbed).

    Args:
        names, kernels: the weight layers' names and kernels, in order.
        epsilon: one number for all perturbed layers, or a dict layer name → number.
        layers: names of the perturbed layers (None: all, or the dict's keys).
        relative: ε_l = ε · ||W_l|| (in `norm`) instead of ε.
    """
    if isinstance(epsilon, dict):
        unknown = sorted(set(epsilon) - set(names))
        if unknown:
            raise ValueError(f"{argument} names layers {unknown} that are not weight layers of the model: {names}.")
        values = {name: validate_epsilon(value, f"{argument}[{name!r}]") for name, value in epsilon.items()}
        if layers is None:
            layers = list(values)
    else:
        value = validate_epsilon(epsilon, argument)
        values = None
    chosen = validate_layers(layers, names)
    radii = []
    for name, kernel in zip(names, kernels):
        if name not in chosen:
            radii.append(0.0)
            continue
        radius = values.get(name, 0.0) if values is not None else value
        if relative:
            radius *= float(operator_norm(kernel, norm))
        radii.append(radius)
    return radii


def perturbed_class_complexity(kernels, radii, norm="inf"):
    """`∏_l (||W_l|| + ε_l)`: the factor through which the perturbed class's complexity grows (a tensor)."""
    total = ops.ones((), "float32")
    for kernel, radius in zip(kernels, radii):
        total = total * (ops.cast(operator_norm(kernel, norm), "float32") + ops.cast(radius, "float32"))
    return total


# ---------------------------------------------------------------------------------------------------------
# "norm" and "activation": chains of operator norms (Dense chains).


def activation_norm_bounds(chain, x, labels, radii, norm="inf", mode="norm", kernels=None, scale=None, dtype="float32"):
    """Per-example bounds `(B, C)` on `m_{y,i}(x|W) − m_{y,i}(x|W+Δ)` (0 in column y), modes `"norm"`/`"activation"`.

    Differentiable with respect to the kernels. `chain` is a `structure.DenseChain`; `radii` the ε_l (floats
    or scalar tensors); `scale` an optional per-example factor `(B,)` on every radius. `dtype`: see
    `compute_dtype` (float64 is float32 on JAX without x64).
    """
    validate_mode(mode, ("norm", "activation"))
    dtype = compute_dtype(dtype)
    kernels = chain.kernels if kernels is None else kernels
    kernels = [ops.cast(k, dtype) for k in kernels]
    x = ops.convert_to_tensor(x)
    h0 = ops.reshape(ops.cast(x, dtype), (ops.shape(x)[0], -1))
    hidden = _dense_hidden(chain, h0, kernels) if mode == "activation" else [h0]
    factor = ops.ones_like(h0[:, 0]) if scale is None else ops.cast(scale, dtype)
    h_norm = vector_norm(hidden[0], norm)
    delta = ops.zeros_like(h_norm)
    for index in range(len(kernels) - 1):
        a = ops.cast(operator_norm(kernels[index], norm), dtype)
        eps = _radius(radii[index], dtype) * factor
        delta = eps * (h_norm + delta) + a * delta
        if mode == "activation":
            h_norm = vector_norm(hidden[index + 1], norm)
        else:
            bias = chain.layers[index].bias
            bias_norm = vector_norm(ops.cast(bias, dtype), norm) if bias is not None else ops.zeros((), dtype)
            h_norm = a * h_norm + bias_norm
    last = kernels[-1]
    num_classes = last.shape[-1]
    labels = labels_vector(labels, num_classes)
    rows = ops.transpose(last)  # (C, n): row c is W_L[c].
    differences = ops.take(rows, labels, axis=0)[:, None, :] - rows[None, :, :]  # (batch, C, n)
    eps_last = _radius(radii[-1], dtype) * factor
    bounds = dual_norm(differences, norm) * delta[:, None] + pair_constant(norm) * (eps_last * (h_norm + delta))[:, None]
    return bounds * (1.0 - ops.one_hot(labels, num_classes, dtype=dtype))


def _radius(value, dtype):
    # A cast of a Python float goes through float32 (1e300 would overflow): build constants directly.
    if _is_tensor(value):
        return ops.cast(value, dtype)
    with np.errstate(over="ignore"):  # 1e300 in float32 is inf: a vacuous bound, as intended.
        return ops.convert_to_tensor(np.asarray(float(value), dtype))


def _dense_hidden(chain, h, kernels):
    hidden = [h]
    for index, (layer, kernel) in enumerate(zip(chain.layers[:-1], kernels[:-1])):
        h = ops.matmul(h, kernel)
        if layer.bias is not None:
            h = h + ops.cast(layer.bias, h.dtype)
        for fn in chain.activations[index]:
            h = ops.cast(fn(h), h.dtype)
        hidden.append(h)
    return hidden


# ---------------------------------------------------------------------------------------------------------
# "interval" and "linear": element-wise bounds of every activation (feed-forward chains, Dense and Conv2D).


def _activation(params, z):
    kind = params["activation"]
    if kind == "piecewise":
        out = ops.where(z < 0, params["negative_slope"] * z, z)
        if params["ceiling"] is not None:
            out = ops.minimum(out, ops.convert_to_tensor(params["ceiling"], z.dtype))
        return out
    if kind == "elu":
        return ops.where(z > 0, z, ops.exp(ops.minimum(z, 0.0)) - 1.0)
    if kind == "tanh":
        return ops.tanh(z)
    raise structure.StructureError(f"No linear relaxation for the activation {kind!r}.")


def _relaxation(params, lower, upper):
    """Linear bounds `a_L z + b_L ≤ σ(z) ≤ a_U z + b_U` on `[lower, upper]` (element-wise tensors)."""
    kind = params["activation"]
    sl, su = _activation(params, lower), _activation(params, upper)
    if kind == "piecewise" and params["ceiling"] is None:
        # Convex, kink at 0: the chord above; below, the line through 0 of slope 1 or the negative slope.
        slope = params["negative_slope"]
        unstable = ops.logical_and(lower < 0, upper > 0)
        width = ops.where(unstable, upper - lower, ops.ones_like(lower))
        chord = (su - sl) / width
        stable_slope = ops.where(lower >= 0, ops.ones_like(lower), ops.full_like(lower, slope))
        a_upper = ops.where(unstable, chord, stable_slope)
        b_upper = ops.where(unstable, sl - chord * lower, ops.zeros_like(lower))
        adaptive = ops.where(upper >= -lower, ops.ones_like(lower), ops.full_like(lower, slope))
        a_lower = ops.where(unstable, adaptive, stable_slope)
        return a_lower, ops.zeros_like(lower), a_upper, b_upper
    # Monotone σ with σ' ≥ s on [l, u]: σ(l) + s (z − l) ≤ σ(z) ≤ σ(u) + s (z − u).
    if kind == "piecewise":
        ceiling = params["ceiling"]
        two = 2.0 * ops.ones_like(lower)
        candidates = [ops.where(lower < 0, ops.full_like(lower, params["negative_slope"]), two),
                      ops.where(ops.logical_and(lower < ceiling, upper > 0), ops.ones_like(lower), two),
                      ops.where(upper > ceiling, ops.zeros_like(lower), two)]
        s = ops.minimum(ops.min(ops.stack(candidates), axis=0), 1.0)
    elif kind == "elu":
        s = ops.exp(ops.minimum(lower, 0.0))
    else:  # tanh: σ' = 1 − tanh², unimodal with its peak at 0, so its minimum is at an end.
        s = ops.minimum(1.0 - ops.square(ops.tanh(lower)), 1.0 - ops.square(ops.tanh(upper)))
    return s, sl - s * lower, s, su - s * upper


def _apply_linear(op, h):
    layer = op.layer
    if op.params.get("flatten") and isinstance(layer, L.Flatten):
        return ops.reshape(h, (ops.shape(h)[0], -1))
    if isinstance(layer, L.Reshape):
        return ops.reshape(h, (ops.shape(h)[0], *layer.target_shape))
    if isinstance(layer, L.AveragePooling2D):
        return ops.average_pool(h, layer.pool_size, layer.strides, str(layer.padding).lower(), data_format="channels_last")
    if isinstance(layer, L.GlobalAveragePooling2D):
        return ops.mean(h, axis=[1, 2], keepdims=bool(layer.keepdims))
    if isinstance(layer, L.ZeroPadding2D):
        (top, bottom), (left, right) = layer.padding
        return ops.pad(h, [[0, 0], [top, bottom], [left, right], [0, 0]])
    raise structure.StructureError(f"No bound propagation for layer {layer.name!r} ({type(layer).__name__}).")


def _padding(op):
    return str(op.params["padding"]).lower()


def _conv(h, kernel, op):
    return ops.conv(h, kernel, op.params["strides"], _padding(op), data_format="channels_last")


def _conv_adjoint(cotangent, kernel, op, input_shape):
    """`convᵀ` applied to `cotangent` `(N, H', W', C_out)`: the exact adjoint (padding and strides included) of
    `h ↦ conv(h, kernel)` on inputs `(N, *input_shape)`, as the VJP of the convolution (differentiable in `kernel`)."""
    zeros = ops.zeros((ops.shape(cotangent)[0], *input_shape), cotangent.dtype)
    _, pullback = backend.vjp(lambda h: _conv(h, kernel, op), zeros)
    return pullback(cotangent)[0]


def _patches(h, op):
    """The `(k_h, k_w, C)` input patch under every output position, `(B, H', W', k_h k_w C)`. (The order of the
    patch's entries may differ between backends; every use here is invariant to it.)"""
    return ops.image.extract_patches(
        h, tuple(op.params["kernel_size"]), strides=tuple(op.params["strides"]), padding=_padding(op),
        data_format="channels_last",
    )


def _patch_norms(magnitude, op, norm):
    """`||patch||_p` of the non-negative tensor `magnitude` `(B, H, W, C)` at each output position `(B, H', W', 1)`."""
    kh, kw = op.params["kernel_size"]
    if norm == "inf":
        per_pixel = ops.max(magnitude, axis=-1, keepdims=True)
        return ops.max_pool(per_pixel, (kh, kw), op.params["strides"], _padding(op), data_format="channels_last")
    power = magnitude if norm == "1" else ops.square(magnitude)
    per_pixel = ops.sum(power, axis=-1, keepdims=True)
    total = ops.conv(per_pixel, ops.ones((kh, kw, 1, 1), per_pixel.dtype), op.params["strides"], _padding(op), data_format="channels_last")
    return total if norm == "1" else ops.sqrt(ops.maximum(total, 0.0))


class _State:
    """Per example batch: the boxes entering every op and the perturbation budgets of the weight layers."""

    def __init__(self):
        self.inputs = []  # (lower, upper, clean) entering each op.
        self.budget = {}  # op index → per-example max ||ĥ||_p over the box (dense), for the linear bound.
        self.eps = {}  # op index → per-example ε_l (B,).
        self.kernels = {}
        self.biases = {}
        self.first_weight = None  # The first weight op: its input is the exact x.
        self.first_output = None  # Its unperturbed output W_1 x + b_1.


def _flat_sum(t, keep):
    shape = ops.shape(t)
    return ops.sum(ops.reshape(t, (shape[0], shape[1], -1)), axis=-1) if keep == 2 else ops.sum(
        ops.reshape(t, (shape[0], -1)), axis=-1)


def _backward(chain, state, index, lam, norm):
    """A lower bound `(B, S)` of `⟨Λ_s, out_index(x|Ŵ)⟩` over the perturbation set, `lam` `(B, S, *shape)`."""
    const = ops.zeros(ops.shape(lam)[:2], lam.dtype)
    batch, specs = ops.shape(lam)[0], ops.shape(lam)[1]
    for j in range(index, -1, -1):
        op = chain.ops[j]
        lower, upper, clean = state.inputs[j]
        if j == state.first_weight:
            # The input is exact: ⟨Λ, (W + Δ) x + b⟩ ≥ ⟨Λ, W x + b⟩ − (the perturbation term), no need for Λ at x.
            const += _flat_sum(lam * state.first_output[:, None], 2)
            if op.kind == "dense":
                return const - state.eps[j][:, None] * dual_norm(lam, norm) * state.budget[j][:, None]
            g = ops.einsum("bshwo,bhwk->bsko", lam, _patches(clean, op))
            if norm == "2":
                term = ops.sum(ops.svd(g, compute_uv=False), axis=-1)
            else:
                term = ops.sum(ops.max(ops.abs(g), axis=-2 if norm == "inf" else -1), axis=-1)
            return const - state.eps[j][:, None] * term
        if op.kind == "dense":
            kernel, bias = state.kernels[j], state.biases[j]
            if bias is not None:
                const += ops.einsum("bso,o->bs", lam, bias)
            const -= state.eps[j][:, None] * dual_norm(lam, norm) * state.budget[j][:, None]
            lam = ops.einsum("bso,io->bsi", lam, kernel)
        elif op.kind == "conv":
            kernel, bias = state.kernels[j], state.biases[j]
            if bias is not None:
                const += ops.einsum("bshwo,o->bs", lam, bias)
            center, radius = (lower + upper) / 2.0, (upper - lower) / 2.0
            pc = _patches(center, op)
            g = ops.einsum("bshwo,bhwk->bsko", lam, pc)
            if norm == "2":
                term = ops.sum(ops.svd(g, compute_uv=False), axis=-1)
                pr = vector_norm(_patches(radius, op), "2")  # (B, H', W')
                term += ops.einsum("bshw,bhw->bs", vector_norm(lam, "2"), pr)
            else:
                spread = ops.einsum("bshwo,bhwk->bsko", ops.abs(lam), _patches(radius, op))
                total = ops.abs(g) + spread
                term = ops.sum(ops.max(total, axis=-2 if norm == "inf" else -1), axis=-1)
            const -= state.eps[j][:, None] * term
            in_shape = tuple(clean.shape[1:])
            flat = ops.reshape(lam, (batch * specs, *lam.shape[2:]))
            back = _conv_adjoint(flat, kernel, op, in_shape)
            lam = ops.reshape(back, (batch, specs, *in_shape))
        elif op.kind == "scale":
            s, t = state.kernels[j], state.biases[j]
            const += _flat_sum(lam * t, 2)
            lam = lam * s
        elif op.kind == "linear":
            in_shape = tuple(clean.shape[1:])
            flat = ops.reshape(lam, (batch * specs, *lam.shape[2:]))
            zeros = ops.zeros((batch * specs, *in_shape), lam.dtype)
            _, pullback = backend.vjp(lambda h: _apply_linear(op, h), zeros)
            lam = ops.reshape(pullback(flat)[0], (batch, specs, *in_shape))
        elif op.kind == "activation":
            a_lower, b_lower, a_upper, b_upper = _relaxation(op.params, lower, upper)
            positive, negative = ops.relu(lam), -ops.relu(-lam)
            const += _flat_sum(positive * b_lower[:, None] + negative * b_upper[:, None], 2)
            lam = positive * a_lower[:, None] + negative * a_upper[:, None]
        elif op.kind == "max_pool":
            lam, offsets = _max_pool_backward(op, lam, lower, upper, clean)
            const += _flat_sum(offsets, 2)
        else:  # pragma: no cover - the reader only produces the kinds above.
            raise structure.StructureError(f"Unknown op kind {op.kind!r}.")
    return const + _flat_sum(lam * state.inputs[0][2][:, None], 2)


def _max_pool(h, op, pool=None):
    return ops.max_pool(h, pool or op.params["pool_size"], op.params["strides"], _padding(op), data_format="channels_last")


def _max_pool_backward(op, lam, lower, upper, clean):
    """Max-pool relaxation: `z_{j*} ≤ max_window z ≤ z_{j*} + max(0, max_{j≠j*} u_j − l_{j*})`, j* the
    arg-max at the box centre. Returns the coefficients on the pool's input and the offsets `Λ⁻ · gap`.

    The arg-max routing is the derivative of the pool at the centre (the first maximum of each window, on every
    backend): its VJP sends each window's coefficient to j*, and its JVP reads `l_{j*}`.
    """
    pool, strides = op.params["pool_size"], op.params["strides"]
    center = ops.stop_gradient((lower + upper) / 2.0)
    pooled, pullback = backend.vjp(lambda h: _max_pool(h, op), center)
    # The JVP `t ↦ t_{j*}` per window, as the VJP of the (linear) pullback.
    _, select = backend.vjp(lambda c: pullback(c)[0], ops.zeros_like(pooled))
    lower_selected = select(lower)[0]
    if any(s < p for s, p in zip(strides, pool)):
        # Overlapping windows: an arg-max of one window may be a competitor in another; keep it (sound).
        others = _max_pool(upper, op)
    else:
        selected = ops.stop_gradient(pullback(ops.ones_like(pooled))[0])
        masked = ops.where(selected > 0, ops.full_like(upper, -np.inf), upper)
        others = _max_pool(masked, op)
    gap = ops.relu(others - lower_selected)  # (B, H', W', C); a one-element window gives relu(−∞) = 0.
    offsets = ops.minimum(lam, 0.0) * gap[:, None]
    # Every spec's coefficients routed at once: the pool acts per channel, so specs are stacked as channels.
    specs, channels = lam.shape[1], lam.shape[-1]
    out_shape, in_shape = tuple(lam.shape[2:4]), tuple(clean.shape[1:3])
    stacked = ops.reshape(ops.transpose(lam, (0, 2, 3, 1, 4)), (-1, *out_shape, specs * channels))
    _, routed = backend.vjp(lambda h: _max_pool(h, op), ops.tile(center, (1, 1, 1, specs)))
    back = ops.reshape(routed(stacked)[0], (-1, *in_shape, specs, channels))
    return ops.transpose(back, (0, 3, 1, 2, 4)), offsets


def _forward_dense(lower, upper, kernel, bias, eps, budget):
    center, radius = (lower + upper) / 2.0, (upper - lower) / 2.0
    mid = ops.matmul(center, kernel)
    if bias is not None:
        mid = mid + bias
    spread = ops.matmul(radius, ops.abs(kernel)) + (eps * budget)[:, None]
    return mid - spread, mid + spread


def bound_margins(
    chain,
    x,
    labels,
    radii,
    norm="inf",
    mode="linear",
    scale=None,
    dense=None,
    kernels=None,
    refine_limit=1024,
    dtype="float64",
):
    """Lower bounds of every perturbed margin `min_{||Δ_l|| ≤ ε_l} m_{y,i}(x | W + Δ)`, per example.

    Args:
        chain: a `structure.FeedForwardChain`.
        x: a batch of inputs; labels: integer labels `(B,)`.
        radii: ε_l per weight layer of `chain` (floats or scalar tensors).
        norm: `"inf"`, `"1"` or `"2"` (the operator norm of the ball).
        mode: `"interval"` or `"linear"` (see the module docstring).
        scale: optional per-example factor `(B,)` on every radius (for the certified radius by bisection).
        dense: the `structure.DenseChain` of the same model when it is a Dense chain: then the `"activation"`
            and `"norm"` bounds are computed too, intersected with the boxes, and the result is never looser.
        kernels: kernels to use instead of the layers' (one per weight layer; differentiable).
        refine_limit: in `"linear"` mode, pre-activation boxes of hidden Dense layers up to this width whose
            inputs come through Dense layers only are tightened by the linear bound itself (one backward pass per
            neuron, batched in chunks); 0 disables it. (After convolutions it was measured to tighten the CNN's
            radii by ~25 % for ~10× the time, so it is not done there.)
        dtype: the computation dtype (float64 by default, so that rounding cannot break a certificate; on JAX
            without `jax_enable_x64` float64 is unavailable and float32 is used, see `compute_dtype`).

    Returns:
        A dict: `logits` `(B, C)` of the unperturbed network, `margins` `(B, C)`, `lower` `(B, C)` (0 in
        column y), and `boxes`: per op of `chain`, `(lower, upper)` bounds of every element of its input over
        the perturbation set.
    """
    validate_mode(mode, ("interval", "linear"))
    dtype = compute_dtype(dtype)
    x = ops.cast(x, dtype)
    batch = ops.shape(x)[0]
    factor = ops.ones((batch,), dtype) if scale is None else ops.cast(scale, dtype)
    weight_ops = chain.weight_ops
    kernels = [op.layer.kernel for op in weight_ops] if kernels is None else list(kernels)
    use_ball = dense is not None
    state = _State()
    lower = upper = clean = x
    h_norm = delta = None
    weight_index = 0
    dense_prefix = True  # Only Dense layers so far: refining is cheap (measured ~10× dearer after convolutions).
    last = len(chain.ops) - 1
    for j, op in enumerate(chain.ops):
        if op.kind in ("dense", "conv"):
            kernel = ops.cast(kernels[weight_index], dtype)
            bias = None if op.layer.bias is None else ops.cast(op.layer.bias, dtype)
            eps = _radius(radii[weight_index], dtype) * factor
            magnitude = ops.maximum(ops.abs(lower), ops.abs(upper))
            if op.kind == "dense":
                if len(lower.shape) != 2:
                    raise structure.StructureError(
                        f"Dense layer {op.name!r} is applied to a rank-{len(lower.shape)} tensor; the bounds need "
                        "flat inputs (add a Flatten layer)."
                    )
                if use_ball:
                    if weight_index == 0:
                        h_norm, delta = vector_norm(clean, norm), ops.zeros((batch,), dtype)
                    else:
                        h_norm = vector_norm(clean, norm)
                        lower = ops.maximum(lower, clean - delta[:, None])
                        upper = ops.minimum(upper, clean + delta[:, None])
                        magnitude = ops.maximum(ops.abs(lower), ops.abs(upper))
                budget = vector_norm(magnitude, norm)
                if use_ball:
                    budget = ops.minimum(budget, h_norm + delta)
                state.inputs.append((lower, upper, clean))
                state.budget[j] = budget
                lower, upper = _forward_dense(lower, upper, kernel, bias, eps, budget)
                clean = ops.matmul(clean, kernel) + (bias if bias is not None else 0.0)
                if use_ball:
                    delta = eps * (h_norm + delta) + ops.cast(operator_norm(kernel, norm), dtype) * delta
                    lower = ops.maximum(lower, clean - delta[:, None])
                    upper = ops.minimum(upper, clean + delta[:, None])
            else:
                dense_prefix = False
                state.inputs.append((lower, upper, clean))
                center, radius = (lower + upper) / 2.0, (upper - lower) / 2.0
                mid = _conv(center, kernel, op) + (bias if bias is not None else 0.0)
                spread = _conv(radius, ops.abs(kernel), op) + eps[:, None, None, None] * _patch_norms(magnitude, op, norm)
                lower, upper = mid - spread, mid + spread
                clean = _conv(clean, kernel, op) + (bias if bias is not None else 0.0)
            state.eps[j], state.kernels[j], state.biases[j] = eps, kernel, bias
            if state.first_weight is None:
                state.first_weight, state.first_output = j, clean
            width = int(lower.shape[-1])
            if mode == "linear" and op.kind == "dense" and j < last and weight_index > 0 and dense_prefix and width <= refine_limit:
                # Backward passes from ±e_k for every neuron k, in chunks that bound the memory.
                identity = ops.eye(width, dtype=dtype)
                specs = ops.concatenate([identity, -identity], 0)
                largest = max(int(np.prod(low.shape[1:])) for low, _, _ in state.inputs)
                chunk = max(1, min(2 * width, _REFINE_ELEMENTS // (max(int(x.shape[0] or 1), 1) * largest)))
                refined = ops.concatenate(
                    [_backward(chain, state, j, ops.tile(specs[start : start + chunk][None], (batch, 1, 1)), norm)
                     for start in range(0, 2 * width, chunk)],
                    axis=1,
                )
                lower = ops.maximum(lower, refined[:, :width])
                upper = ops.minimum(upper, -refined[:, width:])
            weight_index += 1
            continue
        state.inputs.append((lower, upper, clean))
        if op.kind == "activation":
            lower, upper, clean = (_activation(op.params, t) for t in (lower, upper, clean))
        elif op.kind == "scale":
            s, t = op.scale_shift(dtype)
            state.kernels[j], state.biases[j] = s, t
            center, radius = (lower + upper) / 2.0, (upper - lower) / 2.0
            lower, upper = center * s + t - radius * ops.abs(s), center * s + t + radius * ops.abs(s)
            clean = clean * s + t
        elif op.kind == "linear":
            lower, upper, clean = (_apply_linear(op, t) for t in (lower, upper, clean))
        elif op.kind == "max_pool":
            lower, upper, clean = (_max_pool(t, op) for t in (lower, upper, clean))
        else:  # pragma: no cover
            raise structure.StructureError(f"Unknown op kind {op.kind!r}.")

    logits = clean
    num_classes = int(logits.shape[-1])
    labels = labels_vector(labels, num_classes)
    clean_margins = margins(logits, labels)
    off_diagonal = 1.0 - ops.one_hot(labels, num_classes, dtype=dtype)
    # Interval bound of the margins, eliding the last layer: the row difference W_L[y] − W_L[i] acts on the box.
    in_lower, in_upper, _ = state.inputs[last]
    center, radius = (in_lower + in_upper) / 2.0, (in_upper - in_lower) / 2.0
    kernel, bias = state.kernels[last], state.biases[last]
    rows = ops.transpose(kernel)
    differences = ops.take(rows, labels, axis=0)[:, None, :] - rows[None, :, :]  # (B, C, n)
    lower_bound = ops.einsum("bcn,bn->bc", differences, center) - ops.einsum("bcn,bn->bc", ops.abs(differences), radius)
    if bias is not None:
        lower_bound += ops.take(bias, labels, axis=0)[:, None] - bias[None, :]
    lower_bound -= pair_constant(norm) * (state.eps[last] * state.budget[last])[:, None]
    if mode == "linear":
        lam = (ops.one_hot(labels, num_classes, dtype=dtype)[:, None, :] - ops.eye(num_classes, dtype=dtype)[None]) * off_diagonal[..., None]
        lower_bound = ops.maximum(lower_bound, _backward(chain, state, last, lam, norm))
    if use_ball:
        for other in ("activation", "norm"):
            dense_kernels = [ops.cast(k, dtype) for k in kernels]
            drop = activation_norm_bounds(dense, x, labels, radii, norm, other, dense_kernels, factor, dtype)
            lower_bound = ops.maximum(lower_bound, clean_margins - drop)
    boxes = [(low, high) for low, high, _ in state.inputs]
    return {"logits": logits, "margins": clean_margins, "lower": lower_bound * off_diagonal, "boxes": boxes}
