"""What the penalties on the logit Jacobian share: checks, the per-example loss and its cotangent, and the
base classes (one for penalties that read Jacobian products, one for those that also draw random directions).

Notation: logits `z = f(x) ∈ R^C`, `J = ∂z/∂x` per example. Every such penalty is a mean over the batch of a
per-example value (weighted by `sample_weight`), and reads the step's own forward pass through
`PenaltyContext.vjp`/`.jvp` — reverse-mode products only, so each compiles under XLA (DESIGN.md §3).
"""

import warnings

import keras
from keras import ops

from keras_wssi import backend
from keras_wssi import labels
from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import RandomDirections

__all__ = [
    "LOSSES",
    "LogitJacobianPenalty",
    "RandomLogitJacobianPenalty",
    "check_logits_model",
    "checked_logits",
    "loss_cotangent",
    "per_example_loss",
    "per_example_power_norm",
]

# Which per-example loss an input-gradient penalty differentiates.
LOSSES = ("cross_entropy", "compiled")

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
    if logits is None or len(logits.shape) != 2:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(
            f"{penalty_name} needs classifier logits of shape (batch, num_classes); the model returned shape "
            f"{shape}. Jacobian penalties are defined for single-output classifiers."
        )
    num_classes = logits.shape[-1]
    if num_classes is None or num_classes < 2:
        raise ValueError(
            f"{penalty_name} needs logits for at least 2 classes (shape (batch, C), C >= 2), got shape "
            f"{tuple(logits.shape)}."
        )
    return logits


def per_example_loss(logits, y, loss="cross_entropy", model=None, penalty_name="penalty"):
    """Per-example loss on logits: softmax cross-entropy, or the model's compiled loss unreduced."""
    if loss == "cross_entropy":
        sparse, dense = labels.sparse_or_dense(y, logits.shape[-1], f"{penalty_name} (loss='cross_entropy')")
        if sparse is not None:
            return ops.sparse_categorical_crossentropy(sparse, logits, from_logits=True)
        return ops.categorical_crossentropy(dense, logits, from_logits=True)
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(f"{penalty_name} with loss='compiled' needs a model compiled with a loss.")
    if isinstance(compiled, (list, tuple, dict)):
        raise ValueError(f"{penalty_name} with loss='compiled' needs a single loss, got {type(compiled).__name__}.")
    if isinstance(compiled, keras.losses.Loss):
        values = compiled.call(y, logits)  # `call` is the unreduced per-example loss.
    else:
        values = keras.losses.get(compiled)(y, logits)
    values = ops.cast(values, "float32")
    return ops.reshape(values, [ops.shape(logits)[0], -1]) if len(values.shape) != 1 else values


def loss_cotangent(logits, y, loss="cross_entropy", model=None, penalty_name="penalty"):
    """`∂ℓ_i/∂z_i` per example, `(B, C)`, differentiable in the logits (so double backprop sees `p − e_y` move).

    For cross-entropy this is `softmax(z) − e_y` in closed form; for the compiled loss it is the gradient of
    the summed per-example losses with respect to the logits.
    """
    if loss == "cross_entropy":
        sparse, dense = labels.sparse_or_dense(y, logits.shape[-1], f"{penalty_name} (loss='cross_entropy')")
        if dense is None:
            dense = ops.one_hot(sparse, logits.shape[-1], dtype="float32")
        # ∂/∂z of −Σ_c y_c log p_c is p Σ_c y_c − y (= p − e_y for one-hot labels).
        return ops.softmax(logits, axis=-1) * ops.sum(dense, axis=-1, keepdims=True) - dense
    (gradient,) = backend.grad(lambda z: ops.sum(per_example_loss(z, y, loss, model, penalty_name)), logits)
    return gradient


def per_example_power_norm(rows, p, power, epsilon):
    """`||row||_p^power` per example, guarded so that value and gradient stay finite at 0."""
    flat = ops.reshape(rows, [ops.shape(rows)[0], -1])
    if p == 2.0 and power == 2.0:
        return ops.sum(ops.square(flat), axis=-1)
    if p == 1.0 and power == 1.0:
        return ops.sum(ops.abs(flat), axis=-1)
    if p == power and p > 1.0:
        # No root taken: Σ|g|^p has a finite gradient at 0 for p > 1.
        return ops.sum(ops.power(ops.abs(flat), p), axis=-1)
    if p == 2.0:
        total = ops.sum(ops.square(flat), axis=-1)
    else:
        total = ops.sum(ops.power(ops.abs(flat), p), axis=-1)
    return ops.power(total + epsilon**p, power / p)


class LogitJacobianPenalty(Penalty):
    """Shared build-time checks for penalties on the logit Jacobian."""

    requires = frozenset({"inputs", "logits", "input_jacobian"})

    def build(self, model):
        check_logits_model(model, f"{type(self).__name__} ({self.name!r})")
        super().build(model)


class RandomLogitJacobianPenalty(RandomDirections, LogitJacobianPenalty):
    """A logit-Jacobian penalty that draws random unit directions in `R^C` every step (see `RandomDirections`)."""

    def _unit_vectors(self, batch_size, num_classes, centered=False):
        draw = self.normal((batch_size, num_classes))
        if centered:
            draw = draw - ops.mean(draw, axis=-1, keepdims=True)
        return linalg.l2_normalize(draw, axis=-1)
