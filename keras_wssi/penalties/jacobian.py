"""Jacobian penalties: input gradient, Jacobian Frobenius, exact Jacobian spectral norm, cross-Lipschitz, and the
layer-wise spectral upper bound they are compared against (DESIGN.md §1.2, §1.3).

Notation: logits `z = f(x) ∈ R^C`, `J = ∂z/∂x` per example, `P = I − 11ᵀ/C`. Every penalty here is a mean over
the batch of a per-example value (weighted by `sample_weight`), and reads the step's own forward pass through
`PenaltyContext.vjp`/`.jvp` — reverse-mode products only, so each compiles under XLA (DESIGN.md §3).
"""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import register_penalty

__all__ = [
    "CrossLipschitz",
    "InputGradient",
    "JacobianFrobenius",
    "JacobianSpectralNorm",
    "JacobianSpectralNormError",
    "LayerwiseSpectralNorm",
    "LOSSES",
    "SPECTRAL_METHODS",
    "START_VECTORS",
]

# Which per-example loss an input-gradient penalty differentiates.
LOSSES = ("cross_entropy", "compiled")
SPECTRAL_METHODS = ("power_iteration", "lanczos", "exact", "auto")
START_VECTORS = ("random", "fixed", "loss_gradient", "warm")


# ----------------------------------------------------------------------------------------------- validation


def _validate_positive_int(value, argument, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _validate_positive_float(value, argument):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{argument} must be a finite number > 0, got {value!r}.")
    return float(value)


def _validate_unit_interval(value, argument):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{argument} must be a number in [0, 1), got {value!r}.")
    return float(value)


def _validate_choice(value, choices, argument):
    if value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value


def check_logits_model(model, penalty_name):
    """Build-time checks shared by the penalties defined on logits: float inputs, and a warning for a softmax
    output layer (the penalties are defined on the logits, not on probabilities)."""
    for tensor in getattr(model, "inputs", None) or []:
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if "int" in dtype or dtype == "bool":
            raise TypeError(
                f"{penalty_name} differentiates with respect to the inputs, which must be floating point; the model "
                f"input {tensor.name!r} has dtype {dtype}. Cast the data (e.g. images / 255) and use a float Input."
            )
    try:
        activation = structure.output_activation(model)
    except (structure.StructureError, IndexError, AttributeError):
        activation = None  # Subclassed model: the output layer is unknown.
    if activation in ("softmax", "sigmoid", "log_softmax"):
        warnings.warn(
            f"{penalty_name}: the model's output layer applies {activation!r}, but Jacobian penalties are defined "
            "on logits (DESIGN.md §1.2): the penalty will act on probabilities, whose Jacobian vanishes on "
            "confident examples. Remove the output activation and use a loss with from_logits=True.",
            stacklevel=3,
        )


def checked_logits(context, penalty_name):
    """The step's logits, after checking (at trace time, on static shapes) that they are classifier logits."""
    logits = context.logits
    if logits is None or logits.shape.rank != 2:
        shape = None if logits is None else logits.shape
        raise ValueError(
            f"{penalty_name} needs classifier logits of shape (batch, num_classes); the model returned shape "
            f"{shape}. Jacobian penalties are defined for single-output classifiers."
        )
    num_classes = logits.shape[-1]
    if num_classes is None or num_classes < 2:
        raise ValueError(
            f"{penalty_name} needs logits for at least 2 classes (shape (batch, C), C >= 2), got shape {logits.shape}."
        )
    return logits


def _sparse_labels(y, num_classes, penalty_name):
    if y is None:
        raise ValueError(f"{penalty_name} with loss='cross_entropy' needs labels y; fit() was called without them.")
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] == num_classes and num_classes > 1:
        return None, tf.cast(y, tf.float32)  # One-hot or soft labels.
    return tf.cast(tf.reshape(y, [-1]), tf.int32), None


def per_example_loss(logits, y, loss="cross_entropy", model=None, penalty_name="penalty"):
    """Per-example loss on logits: softmax cross-entropy, or the model's compiled loss unreduced."""
    if loss == "cross_entropy":
        sparse, dense = _sparse_labels(y, logits.shape[-1], penalty_name)
        if sparse is not None:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=sparse, logits=logits)
        return tf.nn.softmax_cross_entropy_with_logits(labels=dense, logits=logits)
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(f"{penalty_name} with loss='compiled' needs a model compiled with a loss.")
    if isinstance(compiled, (list, tuple, dict)):
        raise ValueError(f"{penalty_name} with loss='compiled' needs a single loss, got {type(compiled).__name__}.")
    if isinstance(compiled, keras.losses.Loss):
        values = compiled.call(y, logits)  # `call` is the unreduced per-example loss.
    else:
        values = keras.losses.get(compiled)(y, logits)
    values = tf.cast(values, tf.float32)
    return tf.reshape(values, [tf.shape(logits)[0], -1]) if values.shape.rank != 1 else values


def loss_cotangent(logits, y, loss="cross_entropy", model=None, penalty_name="penalty"):
    """`∂ℓ_i/∂z_i` per example, `(B, C)`, differentiable in the logits (so double backprop sees `p − e_y` move).

    For cross-entropy this is `softmax(z) − e_y` in closed form; for the compiled loss it is the gradient of
    the summed per-example losses with respect to the logits.
    """
    if loss == "cross_entropy":
        sparse, dense = _sparse_labels(y, logits.shape[-1], penalty_name)
        if dense is None:
            dense = tf.one_hot(sparse, logits.shape[-1], dtype=tf.float32)
        # ∂/∂z of −Σ_c y_c log p_c is p Σ_c y_c − y (= p − e_y for one-hot labels).
        return tf.nn.softmax(logits) * tf.reduce_sum(dense, axis=-1, keepdims=True) - dense
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(logits)
        total = tf.reduce_sum(per_example_loss(logits, y, loss, model, penalty_name))
    return tape.gradient(total, logits)


def _per_example_power_norm(rows, p, power, epsilon):
    """`||row||_p^power` per example, guarded so that value and gradient stay finite at 0."""
    flat = tf.reshape(rows, [tf.shape(rows)[0], -1])
    if p == 2.0 and power == 2.0:
        return tf.reduce_sum(tf.square(flat), axis=-1)
    if p == 1.0 and power == 1.0:
        return tf.reduce_sum(tf.abs(flat), axis=-1)
    if p == power and p > 1.0:
        # No root taken: Σ|g|^p has a finite gradient at 0 for p > 1.
        return tf.reduce_sum(tf.pow(tf.abs(flat), p), axis=-1)
    if p == 2.0:
        total = tf.reduce_sum(tf.square(flat), axis=-1)
    else:
        total = tf.reduce_sum(tf.pow(tf.abs(flat), p), axis=-1)
    return tf.pow(total + epsilon**p, power / p)


class _LogitJacobianPenalty(Penalty):
    """Shared build-time checks for penalties on the logit Jacobian."""

    requires = frozenset({"inputs", "logits", "input_jacobian"})

    def build(self, model):
        check_logits_model(model, f"{type(self).__name__} ({self.name!r})")
        super().build(model)


# ------------------------------------------------------------------------------------------------- penalties


@register_penalty("input_gradient")
class InputGradient(_LogitJacobianPenalty):
    """Input-gradient penalty (double backpropagation): the mean over the batch of `||∇_x ℓ(x_i)||_p^power`.

    Drucker & LeCun (1992); Ross & Doshi-Velez (2018). `∇_x ℓ = Jᵀ (∂ℓ/∂z)` is one vector-Jacobian product of
    the step's own forward pass; the penalty's weight gradient is a second backward pass through it (double
    backprop). The value is exact, not an estimate. With cross-entropy, `∇_x ℓ = Jᵀ(p − e_y)`, so the penalty is
    `(p − e_y)ᵀ J Jᵀ (p − e_y)` (DESIGN.md §1.3).

    Args:
        strength: λ.
        loss: `"cross_entropy"` (softmax cross-entropy on the logits, default) or `"compiled"` (the model's
            compiled loss, per example, applied to the model's output).
        p: the norm of the gradient, `p >= 1` (2 by default).
        power: the exponent applied to the norm (2 by default: `||∇_x ℓ||²`).
        epsilon: guard of the norm at 0 (used unless `p == power`, where no root is taken).
        name: metric name, `"input_gradient"` by default.

    Example:

    ```python
    model = keras_wssi.architectures.mlp()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  regularizers=[keras_wssi.penalties.InputGradient(0.1)], jit_compile=True)
    ```
    """

    default_name = "input_gradient"

    def __init__(self, strength=0.1, loss="cross_entropy", p=2.0, power=2.0, epsilon=1e-12, name=None):
        self.loss = _validate_choice(loss, LOSSES, "loss")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not float(p) >= 1.0 or not math.isfinite(p):
            raise ValueError(f"p must be a finite number >= 1, got {p!r}.")
        self.p = float(p)
        self.power = _validate_positive_float(power, "power")
        self.epsilon = _validate_positive_float(epsilon, "epsilon")
        super().__init__(strength=strength, name=name)

    def call(self, context):
        logits = checked_logits(context, self.name)
        cotangent = loss_cotangent(logits, context.y, self.loss, context.model, self.name)
        gradients = context.vjp(cotangent)
        return context.reduce_per_example(_per_example_power_norm(gradients, self.p, self.power, self.epsilon))

    def get_config(self):
        return {**super().get_config(), "loss": self.loss, "p": self.p, "power": self.power, "epsilon": self.epsilon}


class _RandomPenalty(_LogitJacobianPenalty):
    """A penalty that draws random directions: a Keras `SeedGenerator` made in `build` (eager), so every step
    draws new vectors and the draws compile under XLA without retracing."""

    def __init__(self, seed=None, **kwargs):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {seed!r}.")
        self.seed = None if seed is None else int(seed)
        super().__init__(**kwargs)

    def build(self, model):
        self._seed_generator = keras.random.SeedGenerator(self.seed, name=f"{self.name}_seed")
        super().build(model)

    def _unit_vectors(self, batch_size, num_classes, centered=False):
        draw = keras.random.normal((batch_size, num_classes), seed=self._seed_generator)
        draw = tf.cast(draw, tf.float32)
        if centered:
            draw = draw - tf.reduce_mean(draw, axis=-1, keepdims=True)
        return linalg.l2_normalize(draw, axis=-1)


@register_penalty("jacobian_frobenius")
class JacobianFrobenius(_RandomPenalty):
    """Jacobian Frobenius penalty `½ ||J||_F²` (Hoffman, Roberts & Yaida, arXiv 1908.02729), mean over the batch.

    With `num_projections = n ≥ 1`, the unbiased random-projection estimate `½ · C/n · Σ_μ ||v_μᵀ J||²` with
    `v_μ` uniform on the unit sphere of `R^C` (`E[v vᵀ] = I/C`): one vector-Jacobian product per projection, new
    directions every step. With `num_projections=-1` the value is exact: `½ Σ_c ||e_cᵀ J||²` (C products).

    Args:
        strength: λ (the paper's `λ_JR`; the ½ is part of the value, as in the paper).
        num_projections: `n ≥ 1` random projections, or `-1` for the exact value.
        seed: seed of the random directions (None: nondeterministic).
        name: metric name, `"jacobian_frobenius"` by default.

    Example:

    ```python
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.JacobianFrobenius(0.01, num_projections=1)])
    ```
    """

    default_name = "jacobian_frobenius"

    def __init__(self, strength=0.01, num_projections=1, seed=None, name=None):
        if isinstance(num_projections, bool) or not isinstance(num_projections, (int, np.integer)) or (
            num_projections != -1 and num_projections < 1
        ):
            raise ValueError(f"num_projections must be an integer >= 1, or -1 for the exact value; got {num_projections!r}.")
        self.num_projections = int(num_projections)
        super().__init__(seed=seed, strength=strength, name=name)

    def call(self, context):
        logits = checked_logits(context, self.name)
        batch, num_classes = tf.shape(logits)[0], logits.shape[-1]
        total = tf.zeros([batch], tf.float32)
        if self.num_projections == -1:
            for c in range(num_classes):
                rows = context.vjp(tf.one_hot(tf.fill([batch], c), num_classes, dtype=tf.float32))
                total += tf.reduce_sum(tf.square(tf.reshape(rows, [batch, -1])), axis=-1)
        else:
            for _ in range(self.num_projections):
                rows = context.vjp(self._unit_vectors(batch, num_classes))
                total += tf.reduce_sum(tf.square(tf.reshape(rows, [batch, -1])), axis=-1)
            total *= float(num_classes) / float(self.num_projections)
        return context.reduce_per_example(0.5 * total)

    def get_config(self):
        return {**super().get_config(), "num_projections": self.num_projections, "seed": self.seed}


@register_penalty("cross_lipschitz")
class CrossLipschitz(_RandomPenalty):
    """Cross-Lipschitz penalty (Hein & Andriushchenko 2017): `1/C² Σ_{l,m} ||∇z_l − ∇z_m||²`, mean over the batch.

    Computed through the identity `Σ_{l,m} ||∇z_l − ∇z_m||² = 2C ||P J||_F²` (Guo et al., arXiv 2007.02209;
    DESIGN.md §1.3), i.e. the value is `(2/C) ||P J||_F²`. Exact (`num_projections=-1`, default): `||P J||_F²` is
    summed over an orthonormal basis `q_1 … q_{C−1}` of the centered subspace `1^⊥`, so it costs `C − 1`
    vector-Jacobian products, not the `C²` differences. Estimate (`n ≥ 1`): `(C − 1)/n Σ_μ ||v_μᵀ J||²` with `v_μ`
    uniform on the unit sphere of `1^⊥` (`E[v vᵀ] = P/(C − 1)`), unbiased.

    Args:
        strength: λ.
        num_projections: `-1` (exact, default) or `n ≥ 1` random projections.
        seed: seed of the random directions.
        name: metric name, `"cross_lipschitz"` by default.

    Example:

    ```python
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.CrossLipschitz(0.01)])
    ```
    """

    default_name = "cross_lipschitz"

    def __init__(self, strength=0.01, num_projections=-1, seed=None, name=None):
        if isinstance(num_projections, bool) or not isinstance(num_projections, (int, np.integer)) or (
            num_projections != -1 and num_projections < 1
        ):
            raise ValueError(f"num_projections must be an integer >= 1, or -1 for the exact value; got {num_projections!r}.")
        self.num_projections = int(num_projections)
        super().__init__(seed=seed, strength=strength, name=name)

    @staticmethod
    def centered_basis(num_classes):
        """`(C − 1, C)` orthonormal rows spanning `1^⊥` (Helmert-like, from a QR of the centering projector)."""
        projector = np.eye(num_classes) - np.full((num_classes, num_classes), 1.0 / num_classes)
        q, _ = np.linalg.qr(projector[:, : num_classes - 1])
        return q.T.astype(np.float32)

    def call(self, context):
        logits = checked_logits(context, self.name)
        batch, num_classes = tf.shape(logits)[0], logits.shape[-1]
        total = tf.zeros([batch], tf.float32)
        if self.num_projections == -1:
            for row in self.centered_basis(num_classes):
                rows = context.vjp(tf.tile(tf.constant(row)[tf.newaxis], [batch, 1]))
                total += tf.reduce_sum(tf.square(tf.reshape(rows, [batch, -1])), axis=-1)
        else:
            for _ in range(self.num_projections):
                rows = context.vjp(self._unit_vectors(batch, num_classes, centered=True))
                total += tf.reduce_sum(tf.square(tf.reshape(rows, [batch, -1])), axis=-1)
            total *= float(num_classes - 1) / float(self.num_projections)
        return context.reduce_per_example((2.0 / num_classes) * total)

    def get_config(self):
        return {**super().get_config(), "num_projections": self.num_projections, "seed": self.seed}


class _SpectralSettings:
    """Validation of the settings shared by the spectral-norm penalty and its error monitor."""

    @staticmethod
    def validate(method, iterations, start):
        return (
            _validate_choice(method, SPECTRAL_METHODS, "method"),
            _validate_positive_int(iterations, "iterations"),
            _validate_choice(start, START_VECTORS, "start"),
        )


def _resolve_method(method, iterations, num_classes):
    if method != "auto":
        return method
    # Exact: C held-constant VJPs. Lanczos: (k + 1) VJPs and k JVPs; a JVP (the VJP of a VJP) measured 1.3 VJPs on
    # the benchmark MLP under XLA (3.8 vs 3.0 ms), so about 2k + 1 VJP-equivalents. Both then pay the same
    # differentiable VJP. Pick the cheaper.
    return "exact" if num_classes <= 2 * iterations + 1 else "lanczos"


@register_penalty("jacobian_spectral_norm")
class JacobianSpectralNorm(_RandomPenalty):
    """Exact Jacobian spectral-norm penalty: the batch mean of `σ_max(∂z/∂x)` or its square.

    Johansson, Strannegård, Engsner & Mostad, "Improved Spectral Norm Regularization for Neural Networks"
    (arXiv 2206.13581): rather than the layer-wise upper bound `∏ σ(W_l)`, penalize the spectral norm of each
    example's input Jacobian itself.

    - `method="power_iteration"`: per example, `iterations` rounds of power iteration on `J Jᵀ` (C×C), each one
      vector-Jacobian product and one Jacobian-vector product (written as the VJP of a VJP: it compiles under
      XLA), then `σ² = ||vᵀ J||²` with `v` held constant, so the gradient flows through `J` only (envelope
      theorem). An estimate from below that converges to `σ_max²`; its error is logged by
      `JacobianSpectralNormError`.
    - `method="lanczos"` (ours): the same products plus one more VJP, but the largest Ritz value of the
      whole Krylov space instead of the last vector's Rayleigh quotient: never worse than power iteration. With
      the default 3 iterations from the `"warm"` start it is within 1% of `σ_max` on average on MNIST MLPs,
      untrained, trained and trained with this penalty (power iteration needs 6+ iterations for that; see
      docs/jacobian_penalties.md).
    - `method="exact"`: the full per-example Jacobian from `C` products (held constant), the top eigenvector
      `v` of `J Jᵀ` (by repeated squaring, `linalg.top_eigenvector`), then the same differentiable `||vᵀ J||²`:
      exact value and exact gradient.
    - `method="auto"` (default): `"exact"` when `C <= 2 · iterations + 1` (up to 7 classes at the default 3
      iterations), else `"lanczos"` — whichever needs fewer products (a JVP costs about 1.3 VJPs).

    Args:
        strength: λ.
        squared: penalize `σ²` (default) or `σ`.
        method: `"auto"` (default), `"lanczos"`, `"power_iteration"` (the paper) or `"exact"`.
        iterations: rounds of `v → J Jᵀ v` (`>= 1`), 3 by default.
        start: start vector: `"random"` (a new Gaussian per example and step), `"fixed"` (one random unit vector
            drawn at build time, for every example), `"loss_gradient"` (`p − e_y`, the direction the loss
            pushes the logits; needs labels) or `"warm"` (ours: per predicted class `c`, a unit vector `v_c`
            that tracks the final vectors `y` of earlier training steps' examples predicted as `c`,
            `v_c ← normalize(d·v_c + (1 − d)·mean(±y))`. The top left singular vector of `J` is largely shared
            within a class, so this start is several times closer to it than a random one on trained MNIST
            MLPs; see docs/jacobian_penalties.md. The `(C, C)` state is updated in training steps only and is
            not saved with the model: after loading, it warms up again within a few steps). Default `"warm"`.
        warm_decay: `d` of `start="warm"`, in [0, 1) (0.9 by default).
        seed: seed of the random start vectors.
        epsilon: guard of `σ = sqrt(σ²)` at 0 (`squared=False`).
        name: metric name, `"jacobian_spectral_norm"` by default.

    Example:

    ```python
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.JacobianSpectralNorm(0.01)],
                  jit_compile=True)
    ```
    """

    default_name = "jacobian_spectral_norm"

    def __init__(
        self,
        strength=0.01,
        squared=True,
        method="auto",
        iterations=3,
        start="warm",
        seed=None,
        epsilon=1e-12,
        warm_decay=0.9,
        name=None,
    ):
        if not isinstance(squared, bool):
            raise TypeError(f"squared must be True or False, got {squared!r}.")
        self.squared = squared
        self.method, self.iterations, self.start = _SpectralSettings.validate(method, iterations, start)
        self.epsilon = _validate_positive_float(epsilon, "epsilon")
        self.warm_decay = _validate_unit_interval(warm_decay, "warm_decay")
        super().__init__(seed=seed, strength=strength, name=name)

    def build(self, model):
        super().build(model)
        self._fixed_start = None
        self._warm_state = None
        if self.start == "warm":
            outputs = getattr(model, "outputs", None) or []
            num_classes = outputs[0].shape[-1] if len(outputs) == 1 and len(outputs[0].shape) == 2 else None
            if num_classes is not None:
                self._warm_state_for(num_classes)
            # Otherwise (a subclassed model) the state is made on the first traced step, where C is known.

    def _warm_state_for(self, num_classes):
        """Per predicted class `c`, a unit vector `v_c` (`(C, C)`) tracking the final vectors of earlier training
        steps' examples predicted as `c`; a zero row is a class not seen yet. Created once."""
        if self._warm_state is None:
            # A class not seen yet starts from a fixed random unit vector: deterministic even without a seed, so runs
            # (and replicas) agree.
            generator = np.random.default_rng(0 if self.seed is None else self.seed)
            initial = generator.standard_normal((num_classes, num_classes)).astype(np.float32)
            self._warm_initial = initial / np.linalg.norm(initial, axis=-1, keepdims=True)
            self._warm_state = keras.Variable(
                np.zeros((num_classes, num_classes), np.float32), trainable=False, name=f"{self.name}_warm_start",
                aggregation="only_first_replica",
            )
        if self._warm_state.shape[0] != num_classes:
            raise ValueError(
                f"{self.name}: start='warm' was built for {self._warm_state.shape[0]} classes, got logits for {num_classes}."
            )
        return self._warm_state

    def _warm_vectors(self, num_classes):
        """`v_c` of every class, the initial vector where the class has not been seen, `(C, C)`."""
        state = self._warm_state_for(num_classes).value
        unseen = tf.reduce_all(tf.equal(state, 0.0), axis=-1, keepdims=True)
        return tf.where(unseen, tf.constant(self._warm_initial), state)

    def _warm_start_vectors(self, logits):
        classes = tf.argmax(tf.stop_gradient(logits), axis=-1, output_type=tf.int32)
        return tf.gather(self._warm_vectors(logits.shape[-1]), classes)

    def _update_warm_state(self, logits, vectors):
        """`v_c ← normalize(d·v_c + (1 − d)·a_c)`, `a_c` the mean of this batch's final vectors of class `c`, each
        signed to agree with the class's start vector (a singular vector's sign is arbitrary). An unseen class has
        `v_c = 0`, so its first update is `a_c` itself."""
        state = self._warm_state
        classes = tf.argmax(tf.stop_gradient(logits), axis=-1, output_type=tf.int32)
        vectors = tf.stop_gradient(vectors)
        current = tf.gather(self._warm_vectors(logits.shape[-1]), classes)
        signs = tf.where(tf.reduce_sum(vectors * current, axis=-1, keepdims=True) < 0.0, -1.0, 1.0)
        members = tf.one_hot(classes, logits.shape[-1], dtype=tf.float32)
        counts = tf.reduce_sum(members, axis=0)
        means = tf.einsum("bk,bc->kc", members, signs * vectors) / tf.maximum(counts, 1.0)[:, tf.newaxis]
        blended = self.warm_decay * state.value + (1.0 - self.warm_decay) * means
        # Classes absent from the batch, or whose signed mean cancels to ~0, keep their vector.
        usable = (counts > 0)[:, tf.newaxis] & (linalg.safe_norm(blended, axis=-1, keepdims=True) > 1e-6)
        state.assign(tf.where(usable, linalg.l2_normalize(blended, axis=-1), state.value))

    def _start_vectors(self, context, logits):
        batch, num_classes = tf.shape(logits)[0], logits.shape[-1]
        if self.start == "warm":
            return self._warm_start_vectors(logits)
        if self.start == "random":
            return self._unit_vectors(batch, num_classes)
        if self.start == "fixed":
            if self._fixed_start is None or self._fixed_start.shape[-1] != num_classes:
                generator = np.random.default_rng(self.seed)
                vector = generator.standard_normal(num_classes).astype(np.float32)
                self._fixed_start = vector / np.linalg.norm(vector)
            return tf.tile(tf.constant(self._fixed_start)[tf.newaxis], [batch, 1])
        direction = tf.stop_gradient(loss_cotangent(logits, context.y, "cross_entropy", None, self.name))
        # A perfectly fit example has p − e_y ≈ 0: fall back to a fixed vector rather than a zero start.
        fallback = tf.fill([batch, num_classes], 1.0 / math.sqrt(num_classes)) + tf.one_hot(
            tf.zeros([batch], tf.int32), num_classes
        )
        small = linalg.safe_norm(direction, axis=-1, keepdims=True) < 1e-6
        return tf.where(small, fallback, direction)

    def sigma_squared(self, context):
        """Per-example `σ_max²` estimate (differentiable through `J` only), `(B,)`."""
        logits = checked_logits(context, self.name)
        batch, num_classes = tf.shape(logits)[0], logits.shape[-1]
        method = _resolve_method(self.method, self.iterations, num_classes)
        if method == "exact":
            jacobian = linalg.jacobian_from_vjp(context.vjp, batch, num_classes, stop_gradients=True)
            top, _ = linalg.top_eigenvector(linalg.gram_from_jacobian(jacobian))
            rows = context.vjp(tf.stop_gradient(top))
            return tf.reduce_sum(tf.square(tf.reshape(rows, [batch, -1])), axis=-1)
        iterate = linalg.jacobian_lanczos if method == "lanczos" else linalg.jacobian_power_iteration
        vectors, sigma_squared = iterate(context.vjp, context.jvp, self._start_vectors(context, logits), self.iterations)
        if self.start == "warm" and context.training:
            self._update_warm_state(logits, vectors)
        return sigma_squared

    def call(self, context):
        sigma_squared = self.sigma_squared(context)
        if not self.squared:
            sigma_squared = tf.sqrt(sigma_squared + self.epsilon**2)
        return context.reduce_per_example(sigma_squared)

    def error_monitor(self, name=None):
        """A zero-strength `JacobianSpectralNormError` with this penalty's settings (add it to `regularizers`)."""
        if self.method == "exact":
            raise ValueError(f"{self.name}: method='exact' has no estimation error to monitor.")
        return JacobianSpectralNormError(
            method=self.method,
            iterations=self.iterations, start=self.start, seed=self.seed, warm_decay=self.warm_decay,
            name=name or f"{self.name}_error",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "squared": self.squared,
            "method": self.method,
            "iterations": self.iterations,
            "start": self.start,
            "seed": self.seed,
            "epsilon": self.epsilon,
            "warm_decay": self.warm_decay,
        }


@register_penalty("jacobian_spectral_norm_error")
class JacobianSpectralNormError(JacobianSpectralNorm):
    """A monitor, not a regularizer: the batch mean of `(σ_max − σ̂)/σ_max`, the relative error of the
    iterative estimate `σ̂` of `JacobianSpectralNorm` with the same `method`, `iterations` and `start`, against the
    exact `σ_max` from the full per-example Jacobian (C more products, all held constant). With `start="warm"`
    the monitor keeps its own state, which follows the penalty's exactly (the same batches and vectors).

    Its strength is 0, so it only adds a metric; the value is ≥ 0 up to round-off (power iteration approaches
    `σ_max` from below).

    Example:

    ```python
    penalty = keras_wssi.penalties.JacobianSpectralNorm(0.01)
    model.compile("sgd", loss, regularizers=[penalty, penalty.error_monitor()])   # logs "jacobian_spectral_norm_error"
    ```
    """

    default_name = "jacobian_spectral_norm_error"

    def __init__(self, method="auto", iterations=3, start="warm", seed=None, strength=0.0, warm_decay=0.9, name=None):
        if strength != 0.0:
            raise ValueError(f"strength of a JacobianSpectralNormError monitor must be 0 (it only logs), got {strength!r}.")
        if method not in ("power_iteration", "lanczos", "auto"):
            raise ValueError(
                f"method must be 'power_iteration', 'lanczos' or 'auto' (the estimates with an error), got {method!r}."
            )
        super().__init__(
            strength=0.0, method=method, iterations=iterations, start=start, seed=seed, warm_decay=warm_decay, name=name
        )

    def call(self, context):
        logits = checked_logits(context, self.name)
        batch, num_classes = tf.shape(logits)[0], logits.shape[-1]
        estimate = tf.stop_gradient(self.sigma_squared(context))
        jacobian = linalg.jacobian_from_vjp(context.vjp, batch, num_classes, stop_gradients=True)
        _, exact = linalg.top_eigenvector(linalg.gram_from_jacobian(jacobian))
        sigma, sigma_hat = tf.sqrt(tf.maximum(exact, 0.0)), tf.sqrt(tf.maximum(estimate, 0.0))
        return context.reduce_per_example(tf.math.divide_no_nan(sigma - sigma_hat, sigma))

    def get_config(self):
        return {
            "strength": 0.0,
            "name": self.name,
            "method": self.method,
            "iterations": self.iterations,
            "start": self.start,
            "seed": self.seed,
            "warm_decay": self.warm_decay,
        }


# ----------------------------------------------------------------------------------- layer-wise upper bound

CONV_NORMS = ("reshaped", "operator")


@register_penalty("layerwise_spectral_norm")
class LayerwiseSpectralNorm(Penalty):
    """Layer-wise spectral-norm upper bound (Yoshida & Miyato, arXiv 1705.10941): `½ Σ_l σ(W_l)²`.

    For a ReLU network `||J||_2 ≤ ∏_l σ(W_l)`; Yoshida & Miyato penalize `(λ/2) Σ_l σ(W_l)²`, each σ by power
    iteration with its vector kept across steps (warm start), `iterations` rounds per step. The vectors are
    non-trainable variables created in `build`, before the step is traced, so the update compiles under XLA.

    For convolutions, `conv_norm="reshaped"` (the paper) uses the kernel reshaped to a `(k_h k_w C_in, C_out)`
    matrix; `conv_norm="operator"` uses the true operator norm of the 2-D convolution on the layer's input
    shape (power iteration through `conv2d` and `conv2d_transpose`, with the layer's strides and padding).
    Other kernels (Dense, depthwise, 1-D/3-D convolutions) always use the reshaped matrix. The same term per
    layer is `keras_wssi.regularizers.SpectralNormRegularizer`.

    Args:
        strength: λ.
        iterations: power-iteration rounds per step (1 in the paper).
        conv_norm: `"reshaped"` (default) or `"operator"`.
        name: metric name, `"layerwise_spectral_norm"` by default.

    Example:

    ```python
    model = keras_wssi.architectures.small_cnn()
    model.compile("sgd", loss, regularizers=[keras_wssi.penalties.LayerwiseSpectralNorm(0.01, conv_norm="operator")])
    ```
    """

    default_name = "layerwise_spectral_norm"
    requires = frozenset({"weights"})

    def __init__(self, strength=0.01, iterations=1, conv_norm="reshaped", name=None):
        self.iterations = _validate_positive_int(iterations, "iterations")
        self.conv_norm = _validate_choice(conv_norm, CONV_NORMS, "conv_norm")
        super().__init__(strength=strength, name=name)

    def build(self, model):
        self._entries = []
        for index, weight_layer in enumerate(structure.weight_layers(model)):
            layer = weight_layer.layer
            for k_index, kernel in enumerate(weight_layer.kernels):
                kind = weight_layer.kind
                if kind == "separable_conv":
                    kind = "depthwise_conv" if k_index == 0 else "dense"
                operator = self.conv_norm == "operator" and kind == "conv" and isinstance(layer, keras.layers.Conv2D)
                operator = operator and not isinstance(layer, keras.layers.Conv2DTranspose)
                if operator:
                    if getattr(layer, "data_format", "channels_last") != "channels_last":
                        raise ValueError(f"{self.name}: conv_norm='operator' supports channels_last, layer {layer.name!r} is not.")
                    input_shape = tuple(layer.input.shape[1:])
                    if any(s is None for s in input_shape):
                        raise ValueError(
                            f"{self.name}: conv_norm='operator' needs a static input shape for layer {layer.name!r}, "
                            f"got {input_shape}."
                        )
                    shape = (1, *input_shape)
                    settings = {"strides": tuple(layer.strides), "padding": layer.padding, "dilations": tuple(layer.dilation_rate)}
                else:
                    shape = tuple(linalg.kernel_matrices(kernel, kind).shape[:2])
                    settings = None
                initial = tf.random.stateless_normal(shape, seed=[len(self._entries), 29])
                initial = initial / tf.norm(tf.reshape(initial, [shape[0], -1]), axis=-1)[
                    (slice(None),) + (tf.newaxis,) * (len(shape) - 1)
                ]
                state = keras.Variable(
                    initial, trainable=False, name=f"{self.name}_u_{index}_{k_index}", aggregation="only_first_replica"
                )
                self._entries.append((kernel, kind, settings, state))
        super().build(model)

    def layer_norms(self):
        """`σ(W_l)` per kernel (updating the warm-start vectors), as a list of scalars."""
        sigmas = []
        for kernel, kind, settings, state in self._entries:
            kernel = tf.cast(kernel, tf.float32)
            if settings is not None:
                new_u, sigma = linalg.conv2d_operator_norm(kernel, state.value, iterations=self.iterations, **settings)
            else:
                new_u, _, sigma_batch = linalg.power_iteration(
                    linalg.kernel_matrices(kernel, kind), state.value, iterations=self.iterations
                )
                sigma = tf.reduce_max(sigma_batch)
            state.assign(new_u)
            sigmas.append(sigma)
        return sigmas

    def call(self, context):
        return 0.5 * tf.add_n([tf.square(s) for s in self.layer_norms()])

    def get_config(self):
        return {**super().get_config(), "iterations": self.iterations, "conv_norm": self.conv_norm}
