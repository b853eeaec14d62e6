"""Certified margins, radii and generalization under norm-bounded weight perturbations.

Tsai, Hsu, Yu, Chen, "Formalizing Generalization and Robustness of Neural Networks to Weight
Perturbations" (arXiv 2103.02200, NeurIPS 2021). For a feed-forward network with perturbed kernels
`Ŵ_l = W_l + Δ_l`, `||Δ_l|| ≤ ε_l` (an operator norm; biases are not perturbed), this module certifies, per
example, that every pairwise class margin `m_{y,i} = z_y − z_i` stays positive over the whole set
(`certified_margins`, `certified_accuracy`), finds the largest such radius (`certified_radius`), draws the
certified-accuracy curve (`certified_accuracy_curve`) and reports the Rademacher-complexity generalization
bound of the perturbed class (`generalization_bound`).

Four bounds (the math is in `keras_wssi.margin_bounds`; derivations and proofs in
docs/weight_perturbation_and_slope.md §1 and §1b):

- `mode="linear"` (default): CROWN-style linear bounds of each margin through every layer, with the per-example
  identity `{Δh : ||Δ|| ≤ ε} = {u : ||u||_p ≤ ε ||h||_p}`; Dense and Conv2D networks with monotone activations,
  pooling, Flatten and BatchNorm (`keras_wssi.structure.feedforward_chain`).
- `mode="interval"`: element-wise bounds of every activation, layer by layer.
- `mode="activation"` and `mode="norm"`: chains of operator norms with, respectively, the example's hidden
  activation norms and the paper's data-independent bound (DESIGN.md §1.4, with biases); Dense chains only.

The returned bound of each mode is the minimum of the sound bounds it computes, so
`linear ≤ interval ≤ activation ≤ norm` element-wise.

Precision: the certificates compute in float64 (so that rounding cannot break them) on TensorFlow and on JAX with
`jax_enable_x64`; on JAX by default (no float64) in float32, where a margin within ~1e-6 relative of its bound
may be certified by rounding.
"""

import math

import numpy as np
from keras import ops

from keras_wssi import margin_bounds
from keras_wssi import structure
from keras_wssi.analysis._compute import precise_dtype
from keras_wssi.margin_bounds import MODES
from keras_wssi.margin_bounds import NORMS
from keras_wssi.margin_bounds import operator_norm
from keras_wssi.margin_bounds import validate_epsilon
from keras_wssi.margin_bounds import validate_layers
from keras_wssi.margin_bounds import validate_weight_norm
from keras_wssi.structure import PIECEWISE_LINEAR_ACTIVATIONS
from keras_wssi.structure import DenseChain
from keras_wssi.structure import dense_chain

__all__ = [
    "MODES",
    "NORMS",
    "PIECEWISE_LINEAR_ACTIVATIONS",
    "DenseChain",
    "certified_accuracy",
    "certified_accuracy_curve",
    "certified_margins",
    "certified_radius",
    "dense_chain",
    "generalization_bound",
    "layer_radii",
    "margin_change_bounds",
    "operator_norm",
    "perturbed_class_complexity",
    "validate_epsilon",
    "validate_layers",
    "validate_weight_norm",
]

DEFAULT_MODE = "linear"
_labels_vector = margin_bounds.labels_vector


def _margins(logits, labels):
    return margin_bounds.margins(ops.cast(logits, "float32"), labels)


def layer_radii(chain, epsilon, layers=None, relative=False, norm="inf", argument="epsilon"):
    """Per weight layer of `chain` (a `DenseChain` or `FeedForwardChain`), the radius ε_l (floats; 0 for
    layers not perturbed). `epsilon`: a number for all perturbed layers or a dict name → number; `layers`:
    the perturbed layers (None: all, or the dict's keys); `relative`: ε_l = ε · ||W_l||."""
    kernels = chain.kernels if isinstance(chain, DenseChain) else [op.layer.kernel for op in chain.weight_ops]
    return margin_bounds.layer_radii(chain.names, kernels, epsilon, layers, relative, norm, argument)


def perturbed_class_complexity(chain, radii, norm="inf", kernels=None):
    """`∏_l (||W_l|| + ε_l)`: the factor through which the perturbed class's complexity grows (a tensor)."""
    return margin_bounds.perturbed_class_complexity(chain.kernels if kernels is None else kernels, radii, norm)


def margin_change_bounds(chain, x, labels, radii, norm="inf", mode="norm", kernels=None):
    """Per-example bounds `(batch, C)` on `m_{y,i}(x|W) − m_{y,i}(x|W+Δ)` (0 in column y), a tensor function.

    `chain` is a `DenseChain` (modes `"norm"`, `"activation"`: DESIGN.md's chain of norm products and its
    per-example version; differentiable in the kernels) or a `FeedForwardChain` (modes `"interval"` and
    `"linear"`, in float32 here; see `keras_wssi.margin_bounds`). `radii` are the ε_l, one per weight layer.
    """
    margin_bounds.validate_mode(mode)
    if mode in ("norm", "activation"):
        if not isinstance(chain, DenseChain):
            raise TypeError(f"mode={mode!r} needs a DenseChain (keras_wssi.structure.dense_chain), got {type(chain).__name__}.")
        return margin_bounds.activation_norm_bounds(chain, x, labels, radii, norm, mode, kernels)
    if not isinstance(chain, structure.FeedForwardChain):
        raise TypeError(f"mode={mode!r} needs a FeedForwardChain (keras_wssi.structure.feedforward_chain), got {type(chain).__name__}.")
    result = margin_bounds.bound_margins(chain, x, labels, radii, norm, mode, kernels=kernels, dtype="float32")
    return ops.relu(result["margins"] - result["lower"])


class _Certifier:
    """Reads the model once and bounds margins batch by batch (per-example radius factors allowed)."""

    def __init__(self, model, epsilon, norm, layers, relative, mode, method="The weight-perturbation certificate"):
        self.norm = validate_weight_norm(norm)
        self.mode = margin_bounds.validate_mode(mode)
        self.model = model
        self.chain = structure.feedforward_chain(model, method=method)
        try:
            self.dense = dense_chain(model, method=method)
        except structure.StructureError:
            if mode in ("norm", "activation"):
                raise structure.StructureError(
                    f"{method}: mode={mode!r} covers Dense chains only (its operator norms are those of Dense "
                    "maps); use mode='linear' or 'interval' for convolutional networks."
                ) from None
            self.dense = None
        self.radii = layer_radii(self.chain, epsilon, layers=layers, relative=relative, norm=self.norm)
        self.num_classes = self.chain.num_classes

    def bounds(self, x, y, scale=None):
        """`(margins, lower)` NumPy arrays `(B, C)`: the clean margins and lower bounds of the perturbed ones."""
        labels = np.asarray(y)
        x = ops.convert_to_tensor(np.asarray(x, np.float32))
        y = ops.convert_to_tensor(labels, "int32")
        dtype = precise_dtype()  # float64, or float32 on JAX without x64 (module docstring).
        if scale is not None:
            scale = ops.convert_to_tensor(np.asarray(scale, dtype))
        if self.mode in ("norm", "activation"):
            logits = ops.cast(self.model(x, training=False), dtype)
            clean = margin_bounds.margins(logits, y)
            drop = margin_bounds.activation_norm_bounds(self.dense, x, y, self.radii, self.norm, self.mode, scale=scale, dtype=dtype)
            lower = _numpy64(clean - drop)
            return _numpy64(clean), np.where(np.isnan(lower), -np.inf, lower)
        result = margin_bounds.bound_margins(
            self.chain, x, y, self.radii, self.norm, self.mode, scale=scale, dense=self.dense, dtype=dtype
        )
        # A NaN can only come from ∞ − ∞ at astronomically large radii: the bound is then vacuous (−∞).
        lower = _numpy64(result["lower"])
        lower = np.where(np.isnan(lower), -np.inf, lower)
        logits = _numpy64(self.model(x, training=False))
        reference = float(np.max(np.abs(logits)))
        error = float(np.max(np.abs(logits - _numpy64(result["logits"]))))
        if error > 1e-3 * (1.0 + reference):
            raise structure.StructureError(
                f"The chain read from model {self.model.name!r} does not reproduce its logits (difference {error:.3g}); "
                "a layer is used in a way the certificate does not model."
            )
        lower = np.where(np.eye(self.num_classes, dtype=bool)[labels], 0.0, lower)  # Column y stays 0.
        return _numpy64(result["margins"]), np.nan_to_num(lower, nan=0.0, posinf=np.inf, neginf=-np.inf)


def _numpy64(t):
    return np.asarray(ops.convert_to_numpy(t)).astype(np.float64)


def _batches(x, y, batch_size, num_classes):
    x = np.asarray(x)
    y = np.asarray(ops.convert_to_numpy(_labels_vector(y, num_classes)))
    if len(x) == 0:
        raise ValueError("x must hold at least one example.")
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or infinite values; the certificate needs finite inputs.")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same number of examples, got {len(x)} and {len(y)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return x, y


def certified_margins(
    model, x, y, epsilon, norm="inf", layers=None, relative=False, mode=DEFAULT_MODE, batch_size=64
):
    """Per-example certified margins under weight perturbations `||Δ_l|| ≤ ε_l` (Tsai et al. 2021).

    Args:
        model: a feed-forward network: Dense and Conv2D layers, monotone activations, pooling, Flatten,
            inference BatchNorm (see `keras_wssi.structure.feedforward_chain`); modes `"norm"` and
            `"activation"` need a Dense chain (`keras_wssi.structure.dense_chain`).
        x: inputs `(N, …)`; y: integer labels `(N,)` or one-hot.
        epsilon: the radius: a number for every perturbed layer, or a dict layer name → radius.
        norm: `"inf"` (default, max-row-ℓ1, the paper's), `"1"` (max-column-ℓ1) or `"2"` (spectral).
        layers: names of the perturbed weight layers (None: all).
        relative: radii are `ε · ||W_l||` instead of `ε`.
        mode: `"linear"` (default: linear bounds through every layer; the tightest, never looser than the
            others), `"interval"` (element-wise bounds of every activation), `"activation"` or `"norm"`
            (DESIGN.md's chains of operator norms; Dense chains only).
        batch_size: examples per batch.

    Returns:
        A dict of NumPy arrays: `margins` `(N, C)` with `m_{y,i}`, `bounds` `(N, C)` (the largest decrease of
        each margin over the ball; 0 at y), `certified_margin` `(N,)` = `min_{i≠y} m_{y,i} − bound_{y,i}`,
        `certified` `(N,)` bool (> 0), and `radii` (per weight layer).

    Example:

    ```python
    result = keras_wssi.analysis.certified_margins(model, x_test[:500], y_test[:500], epsilon=1e-3)
    print(result["certified"].mean())
    ```
    """
    certifier = _Certifier(model, epsilon, norm, layers, relative, mode)
    x, y = _batches(x, y, batch_size, certifier.num_classes)
    margins, lower = [], []
    for start in range(0, len(x), batch_size):
        m, low = certifier.bounds(x[start : start + batch_size], y[start : start + batch_size])
        margins.append(m)
        lower.append(low)
    margins, lower = np.concatenate(margins), np.concatenate(lower)
    true_column = np.eye(certifier.num_classes, dtype=bool)[y]
    bounds = np.where(true_column, 0.0, np.maximum(margins - lower, 0.0))
    certified_margin = np.where(true_column, np.inf, margins - bounds).min(axis=1)
    return {
        "margins": margins,
        "bounds": bounds,
        "certified_margin": certified_margin,
        "certified": certified_margin > 0,
        "radii": np.asarray(certifier.radii),
    }


def certified_accuracy(
    model, x, y, epsilon, norm="inf", layers=None, relative=False, mode=DEFAULT_MODE, batch_size=64
):
    """The fraction of examples whose every true-class margin exceeds its bound at radius `epsilon`:
    their prediction is correct for every perturbation in the ball. Arguments as `certified_margins`.

    Example:

    ```python
    keras_wssi.analysis.certified_accuracy(model, x_test[:1000], y_test[:1000], epsilon=1e-2)
    ```
    """
    result = certified_margins(model, x, y, epsilon, norm, layers, relative, mode, batch_size)
    return float(result["certified"].mean())


def certified_radius(
    model,
    x,
    y,
    epsilon=1.0,
    norm="inf",
    layers=None,
    relative=False,
    mode=DEFAULT_MODE,
    max_radius=1.0,
    iterations=14,
    batch_size=64,
):
    """Per example, the largest radius `r` at which it is certified (`r · epsilon` per layer), by bisection.

    The bisection runs on `log r` over `[max_radius · 2^-30, max_radius]`, all examples of a batch at once (each
    with its own radius): `iterations` halvings give a relative precision of `2^(30 / 2^iterations) − 1`
    (0.13 % for 14). The returned radius is always a certified one (the lower end of the final bracket):
    0 for examples misclassified (or not certified at `max_radius · 2^-30`), `max_radius` for those certified
    there.

    Args:
        model, x, y, norm, layers, relative, mode, batch_size: as `certified_margins`.
        epsilon: the direction: one number (all perturbed layers alike) or a dict name → weight.
        max_radius: the largest radius tried.
        iterations: bisection steps (≥ 1).

    Returns:
        A NumPy array `(N,)` of radii.

    Example:

    ```python
    radii = keras_wssi.analysis.certified_radius(model, x_test[:1000], y_test[:1000])
    print(np.median(radii))
    ```
    """
    max_radius = validate_epsilon(max_radius, "max_radius")
    if max_radius == 0.0:
        raise ValueError("max_radius must be positive, got 0.")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}.")
    certifier = _Certifier(model, epsilon, norm, layers, relative, mode)
    x, y = _batches(x, y, batch_size, certifier.num_classes)
    span = 30.0
    radii = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]

        def certified(scale):
            margins, lower = certifier.bounds(xb, yb, scale=scale)
            lower = np.where(np.eye(certifier.num_classes, dtype=bool)[yb], np.inf, lower)
            return lower.min(axis=1) > 0

        top = certified(np.full(len(xb), max_radius))
        bottom = certified(np.full(len(xb), max_radius * 2.0**-span))
        low = np.full(len(xb), -span)  # log2(r / max_radius): certified at low, not at high.
        high = np.zeros(len(xb))
        for _ in range(iterations):
            middle = (low + high) / 2.0
            ok = certified(max_radius * 2.0**middle)
            low = np.where(ok, middle, low)
            high = np.where(ok, high, middle)
        radius = max_radius * 2.0**low
        radius = np.where(top, max_radius, np.where(bottom, radius, 0.0))
        radii.append(radius)
    return np.concatenate(radii)


def certified_accuracy_curve(
    model, x, y, epsilons, norm="inf", layers=None, relative=False, mode=DEFAULT_MODE, batch_size=64
):
    """Certified accuracy at every radius of `epsilons` (one certification pass per radius).

    Returns `{"epsilons": [...], "certified_accuracy": [...], "settings": {...}}`, the shape of the
    weight-perturbation evaluation curves, so that a report can show both side by side.

    Example:

    ```python
    curve = keras_wssi.analysis.certified_accuracy_curve(model, x_test[:500], y_test[:500], [0, 1e-3, 1e-2])
    ```
    """
    if np.isscalar(epsilons):
        epsilons = [epsilons]
    epsilons = [validate_epsilon(e, "epsilons") for e in epsilons]
    if not epsilons:
        raise ValueError("epsilons must hold at least one radius.")
    accuracies = [certified_accuracy(model, x, y, e, norm, layers, relative, mode, batch_size) for e in epsilons]
    settings = {"norm": validate_weight_norm(norm), "mode": mode, "relative": bool(relative),
                "layers": None if layers is None else list(layers), "num_examples": int(len(x))}
    return {"epsilons": epsilons, "certified_accuracy": accuracies, "settings": settings}


def generalization_bound(model, x, y, epsilon, layers=None, relative=False, margin=1.0, delta=0.05, mode=DEFAULT_MODE):
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
    chain = dense_chain(model, method="The generalization bound")
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
