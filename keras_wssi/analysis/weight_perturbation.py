"""Certified margins and generalization under norm-bounded weight perturbations.

Tsai, Hsu, Yu, Chen, "Formalizing Generalization and Robustness of Neural Networks to Weight
Perturbations" (arXiv 2103.02200, NeurIPS 2021). For a feed-forward network
`z = W_L σ(W_{L-1} … σ(W_1 x + b_1) … + b_{L-1}) + b_L` and perturbed kernels `Ŵ_l = W_l + Δ_l` with
`||Δ_l|| ≤ ε_l` (an operator norm), this module bounds, per example, how far every pairwise class margin
`m_{y,i} = z_y − z_i` can move, and reports the certified accuracy and the Rademacher-complexity
generalization bound of the perturbed class.

The bound (DESIGN.md §1.4, generalised to biases and to three operator norms; derivation in
docs/weight_perturbation_and_slope.md). With `p` the vector norm whose induced operator norm is used
(`"inf"`: max-row-ℓ1; `"1"`: max-column-ℓ1; `"2"`: spectral), `q` its dual, `a_l = ||W_l||`,
`H_0 = ||x||_p`, `δ_0 = 0` and for `l < L`:

    δ_l = ε_l (H_{l-1} + δ_{l-1}) + a_l δ_{l-1}                       (bound on ||ĥ_l − h_l||_p)
    H_l = a_l H_{l-1} + ||b_l||_p          (mode="norm", the paper's data-independent chain), or
    H_l = ||h_l(x)||_p                     (mode="activation", ours: the actual hidden activations)

    bound_{y,i} = ||W_L[y] − W_L[i]||_q δ_{L-1} + c_p ε_L (H_{L-1} + δ_{L-1}),   c_p = ||e_y − e_i||_q

(`c_∞ = 2`, `c_1 = 1`, `c_2 = √2`). Without biases and with `p = ∞`, `mode="norm"` is exactly DESIGN.md's
`X [||W_L[y] − W_L[i]||_1 (∏_{l<L}(a_l+ε_l) − ∏_{l<L} a_l) + 2 ε_L ∏_{l<L}(a_l+ε_l)]`. The bound holds for
every elementwise activation with `σ(0) = 0` that is 1-Lipschitz; of these the monotone ones are accepted
(linear, ReLU, leaky ReLU with slope ≤ 1, ReLU6, ELU, tanh), which contains the paper's non-negative
monotone class restricted to `σ(0) = 0`. Biases are not perturbed.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_wssi import structure
from keras_wssi.structure import DenseChain
from keras_wssi.structure import dense_chain

__all__ = [
    "NORMS",
    "DenseChain",
    "certified_accuracy",
    "certified_margins",
    "dense_chain",
    "generalization_bound",
    "layer_radii",
    "margin_change_bounds",
    "operator_norm",
    "perturbed_class_complexity",
    "validate_epsilon",
    "validate_weight_norm",
]

L = keras.layers

# Canonical operator-norm names: the vector norm p whose induced operator norm bounds ||Δ_l||.
NORMS = ("inf", "1", "2")
_NORM_ALIASES = {
    "inf": "inf", "linf": "inf", "infinity": "inf", "max_row_l1": "inf",
    "1": "1", "l1": "1", "max_column_l1": "1",
    "2": "2", "l2": "2", "spectral": "2",
}
# ||e_y − e_i||_q for the dual norm q of p.
_PAIR_CONSTANT = {"inf": 2.0, "1": 1.0, "2": math.sqrt(2.0)}



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


def operator_norm(kernel, norm="inf"):
    """The operator norm of the map `W = kernelᵀ` of a Dense kernel `(fan_in, fan_out)`.

    `"inf"`: max over outputs of the ℓ1 norm of the incoming weights (max-row-ℓ1 of W); `"1"`: max over
    inputs of the ℓ1 norm of the outgoing weights; `"2"`: the largest singular value (an SVD).
    """
    norm = validate_weight_norm(norm)
    kernel = tf.cast(kernel, tf.float32)
    if norm == "inf":
        return tf.reduce_max(tf.reduce_sum(tf.abs(kernel), axis=0))
    if norm == "1":
        return tf.reduce_max(tf.reduce_sum(tf.abs(kernel), axis=1))
    return tf.linalg.svd(kernel, compute_uv=False)[0]


def _vector_norm(v, norm):
    if norm == "inf":
        return tf.reduce_max(tf.abs(v), axis=-1)
    if norm == "1":
        return tf.reduce_sum(tf.abs(v), axis=-1)
    # Guarded: the gradient of sqrt at 0 is infinite (DESIGN.md §3); 1e-24 changes the value by ≤ 1e-12.
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=-1) + 1e-24)


def _dual_norm(v, norm):
    return _vector_norm(v, {"inf": "1", "1": "inf", "2": "2"}[norm])


def layer_radii(chain, epsilon, layers=None, relative=False, norm="inf", argument="epsilon"):
    """Per Dense layer of `chain`, the radius ε_l (a Python float list; 0 for layers not perturbed).

    Args:
        epsilon: one number for all perturbed layers, or a dict layer name → number.
        layers: names of the perturbed layers (None: all, or the dict's keys).
        relative: ε_l = ε · ||W_l|| (in `norm`) instead of ε.
    """
    names = chain.names
    if isinstance(epsilon, dict):
        unknown = sorted(set(epsilon) - set(names))
        if unknown:
            raise ValueError(f"{argument} names layers {unknown} that are not Dense layers of the model: {names}.")
        values = {name: validate_epsilon(value, f"{argument}[{name!r}]") for name, value in epsilon.items()}
        if layers is None:
            layers = list(values)
    else:
        value = validate_epsilon(epsilon, argument)
        values = None
    chosen = validate_layers(layers, names)
    radii = []
    for layer, name in zip(chain.layers, names):
        if name not in chosen:
            radii.append(0.0)
            continue
        radius = values.get(name, 0.0) if values is not None else value
        if relative:
            radius *= float(operator_norm(layer.kernel, norm))
        radii.append(radius)
    return radii


def validate_layers(layers, names, argument="layers"):
    """The set of chosen layer names (all when `layers` is None); unknown names raise a ValueError."""
    if layers is None:
        return set(names)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(f"{argument} names layers {unknown} that do not exist among the Dense layers {names}.")
    if not layers:
        raise ValueError(f"{argument} must name at least one layer (or be None for all), got an empty list.")
    return set(layers)


def _labels_vector(labels, num_classes):
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape.rank >= 2 and labels.shape[-1] == num_classes:
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    return tf.reshape(tf.cast(labels, tf.int32), [-1])


def margin_change_bounds(chain, x, labels, radii, norm="inf", mode="norm", kernels=None):
    """Per-example bounds `(batch, C)` on `m_{y,i}(x|W) − m_{y,i}(x|W+Δ)` (0 in column y), a tensor function.

    Differentiable with respect to the kernels (used by the theory-driven loss). `radii` are the ε_l
    (floats or scalar tensors), one per Dense layer of `chain`; `mode` is `"norm"` (DESIGN.md's chain of
    norm products) or `"activation"` (the actual hidden-activation norms, tighter; ours).
    """
    if mode not in ("norm", "activation"):
        raise ValueError(f"mode must be 'norm' or 'activation', got {mode!r}.")
    kernels = chain.kernels if kernels is None else kernels
    kernels = [tf.cast(k, tf.float32) for k in kernels]
    hidden, _ = chain.hidden(x, kernels) if mode == "activation" else ([tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])], None)
    h_norm = _vector_norm(hidden[0], norm)
    delta = tf.zeros_like(h_norm)
    for index in range(len(kernels) - 1):
        a = operator_norm(kernels[index], norm)
        eps = tf.cast(radii[index], tf.float32)
        delta = eps * (h_norm + delta) + a * delta
        if mode == "activation":
            h_norm = _vector_norm(hidden[index + 1], norm)
        else:
            bias = chain.layers[index].bias
            bias_norm = _vector_norm(tf.cast(bias, tf.float32), norm) if bias is not None else 0.0
            h_norm = a * h_norm + bias_norm
    last = kernels[-1]
    num_classes = last.shape[-1]
    labels = _labels_vector(labels, num_classes)
    rows = tf.transpose(last)  # (C, n): row c is W_L[c].
    differences = tf.gather(rows, labels)[:, None, :] - rows[None, :, :]  # (batch, C, n)
    eps_last = tf.cast(radii[-1], tf.float32)
    bounds = _dual_norm(differences, norm) * delta[:, None] + _PAIR_CONSTANT[norm] * eps_last * (h_norm + delta)[:, None]
    return bounds * (1.0 - tf.one_hot(labels, num_classes, dtype=tf.float32))


def _margins(logits, labels):
    logits = tf.cast(logits, tf.float32)
    true = tf.gather(logits, labels, axis=1, batch_dims=1)
    return true[:, None] - logits


def certified_margins(model, x, y, epsilon, norm="inf", layers=None, relative=False, mode="norm", batch_size=512):
    """Per-example certified margins under weight perturbations `||Δ_l|| ≤ ε_l` (Tsai et al. 2021).

    Args:
        model: a Dense network (see `dense_chain`).
        x: inputs `(N, …)`; y: integer labels `(N,)` or one-hot.
        epsilon: the radius: a number for every perturbed layer, or a dict layer name → radius.
        norm: `"inf"` (default, max-row-ℓ1, the paper's), `"1"` (max-column-ℓ1) or `"2"` (spectral).
        layers: names of the perturbed Dense layers (None: all).
        relative: radii are `ε · ||W_l||` instead of `ε`.
        mode: `"norm"` (DESIGN.md's bound) or `"activation"` (tighter, uses the hidden activations).
        batch_size: examples per batch.

    Returns:
        A dict of NumPy arrays: `margins` `(N, C)` with `m_{y,i}`, `bounds` `(N, C)` (0 at y),
        `certified_margin` `(N,)` = `min_{i≠y} m_{y,i} − bound_{y,i}`, `certified` `(N,)` bool (> 0), and
        `radii` (per layer).

    Example:

    ```python
    result = keras_wssi.analysis.certified_margins(model, x_test[:500], y_test[:500], epsilon=1e-3)
    print(result["certified"].mean())
    ```
    """
    chain = structure.dense_chain(model)
    norm = validate_weight_norm(norm)
    radii = layer_radii(chain, epsilon, layers=layers, relative=relative, norm=norm)
    x = np.asarray(x)
    num_classes = chain.layers[-1].units
    y = _labels_vector(y, num_classes).numpy()
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same number of examples, got {len(x)} and {len(y)}.")
    margins, bounds = [], []
    for start in range(0, len(x), batch_size):
        xb = tf.convert_to_tensor(x[start : start + batch_size], tf.float32)
        yb = tf.convert_to_tensor(y[start : start + batch_size])
        logits = model(xb, training=False)
        margins.append(_margins(logits, yb).numpy())
        bounds.append(margin_change_bounds(chain, xb, yb, radii, norm=norm, mode=mode).numpy())
    margins, bounds = np.concatenate(margins), np.concatenate(bounds)
    slack = np.where(np.eye(num_classes, dtype=bool)[y], np.inf, margins - bounds)
    certified_margin = slack.min(axis=1)
    return {
        "margins": margins,
        "bounds": bounds,
        "certified_margin": certified_margin,
        "certified": certified_margin > 0,
        "radii": np.asarray(radii),
    }


def certified_accuracy(model, x, y, epsilon, norm="inf", layers=None, relative=False, mode="norm", batch_size=512):
    """The fraction of examples whose every true-class margin exceeds its bound at radius `epsilon`:
    their prediction is correct for every perturbation in the ball. Arguments as `certified_margins`."""
    result = certified_margins(model, x, y, epsilon, norm, layers, relative, mode, batch_size)
    return float(result["certified"].mean())


def perturbed_class_complexity(chain, radii, norm="inf", kernels=None):
    """`∏_l (||W_l|| + ε_l)`: the factor through which the perturbed class's complexity grows (a tensor)."""
    kernels = chain.kernels if kernels is None else kernels
    total = tf.ones([], tf.float32)
    for kernel, radius in zip(kernels, radii):
        total = total * (operator_norm(kernel, norm) + tf.cast(radius, tf.float32))
    return total


def generalization_bound(model, x, y, epsilon, layers=None, relative=False, margin=1.0, delta=0.05, mode="norm"):
    """The Rademacher-complexity generalization bound of the weight-perturbed class (max-row-ℓ1 norm).

    Every network in the ball `||Ŵ_l − W_l||_∞ ≤ ε_l` has `||Ŵ_l||_∞ ≤ a_l + ε_l`. For such ReLU-type
    networks layer peeling (Bartlett & Mendelson 2002; the argument of Tsai et al. 2021, Thm. on the
    perturbed class) bounds the empirical Rademacher complexity of each logit by

        R = 2^{L-1} X ∏_l (a'_l + ε_l) sqrt(2 log(2 d') / n),

    with `X = max_i ||x_i||_∞`; biases are folded in by augmenting the input with a constant 1
    (`a'_l = max(||[W_l, b_l]||_∞, 1)`, `X' = max(X, 1)`, `d' = d + 1`) when the model has them. The
    multi-class margin bound (Mohri et al., Foundations of ML, Thm. 9.2 with empirical complexity) gives,
    with probability `1 − δ`, for every perturbed network:

        error ≤ R̂_ρ + (4 C / ρ) R + 3 sqrt(log(2/δ) / (2n)),

    where `R̂_ρ` is the fraction of `(x, y)` whose *certified* margin (worst case over the ball) is ≤ ρ.
    The centre `W` is treated as fixed before seeing the sample (no union bound over `W`).

    Args:
        model, x, y, epsilon, layers, relative, mode: as `certified_margins` (norm is `"inf"`).
        margin: ρ > 0.
        delta: the confidence parameter in (0, 1).

    Returns:
        A dict: `rademacher` (R), `complexity_product` (∏(a'_l + ε_l)), `empirical_margin_loss` (R̂_ρ),
        `confidence_term`, `bound` (may exceed 1: the usual vacuity of norm bounds), `n`.
    """
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite positive number ρ, got {margin!r}.")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}.")
    chain = structure.dense_chain(model, method="The generalization bound")
    radii = layer_radii(chain, epsilon, layers=layers, relative=relative, norm="inf")
    x = np.asarray(x, np.float32)
    n = len(x)
    if n == 0:
        raise ValueError("x must hold at least one example.")
    flat = x.reshape(n, -1)
    has_bias = any(layer.bias is not None for layer in chain.layers)
    scale = float(np.abs(flat).max())
    dimension = flat.shape[1]
    product = 1.0
    for layer, radius in zip(chain.layers, radii):
        kernel = np.abs(np.asarray(layer.kernel, np.float64))
        column = kernel.sum(axis=0)
        if has_bias:
            bias = np.abs(np.asarray(layer.bias, np.float64)) if layer.bias is not None else 0.0
            a = max(float((column + bias).max()), 1.0)
        else:
            a = float(column.max())
        product *= a + radius
    if has_bias:
        scale, dimension = max(scale, 1.0), dimension + 1
    depth = len(chain.layers)
    rademacher = 2.0 ** (depth - 1) * scale * product * math.sqrt(2.0 * math.log(2.0 * dimension) / n)
    certified = certified_margins(model, x, y, epsilon, norm="inf", layers=layers, relative=relative, mode=mode)
    empirical = float(np.mean(certified["certified_margin"] <= margin))
    num_classes = chain.layers[-1].units
    confidence = 3.0 * math.sqrt(math.log(2.0 / delta) / (2.0 * n))
    return {
        "rademacher": rademacher,
        "complexity_product": product,
        "empirical_margin_loss": empirical,
        "confidence_term": confidence,
        "bound": empirical + 4.0 * num_classes / margin * rademacher + confidence,
        "n": n,
    }
