"""The functional entry point: the total penalty of one batch, for custom training loops and for the wrapper.

`keras_wssi.Model.train_step` / `test_step` call `penalty_loss` too, so a custom loop that uses it gets exactly
the wrapper's penalties (the same forward pass, products, state updates and strengths).
"""

import collections

import keras

from keras_wssi import backend
from keras_wssi.context import PenaltyContext
from keras_wssi.penalties.base import Penalty

__all__ = ["PenaltyLoss", "check_penalties", "penalty_loss"]

PenaltyLoss = collections.namedtuple("PenaltyLoss", ["total", "values", "y_pred"])
PenaltyLoss.__doc__ = """What `penalty_loss` returns.

Attributes:
    total: `Σ strength · value` over the penalties that train (monitors excluded), a float32 scalar.
    values: `{name: value}`, every penalty's un-weighted value (float32 scalars), in order.
    y_pred: the model's output on the batch (from the one forward pass the penalties read).
"""


def check_penalties(penalties):
    """The penalties as a list of `Penalty` objects with unique names (each is a metric), or a clear error."""
    if isinstance(penalties, Penalty):
        penalties = [penalties]
    penalties = list(penalties)
    for penalty in penalties:
        if not isinstance(penalty, Penalty):
            raise TypeError(
                f"penalties must be keras_wssi.penalties.Penalty objects, got {penalty!r} ({type(penalty).__name__}). "
                "Create them once, outside the loop (e.g. `keras_wssi.penalties.get('weissi:1e-3')`), so their state "
                "persists across steps."
            )
    names = [p.name for p in penalties]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Penalty names must be unique (each is a metric), got duplicates {duplicates}: pass name=... to tell them apart."
        )
    return penalties


def penalty_loss(model, penalties, x, y=None, sample_weight=None, training=True):
    """The penalties of one batch: runs the forward pass and returns `PenaltyLoss(total, values, y_pred)`.

    Call it inside your own `tf.GradientTape` and add `total` to your data loss computed from `y_pred`: the
    forward pass is shared, and when a penalty needs input-Jacobian products the pass runs under a tape that
    watches `x`, so the products reuse it. Unbuilt penalties are built on first use (creating their state).
    Under a distribution strategy, scale `total` per replica as you scale your data loss.

    This is what `keras_wssi.Model` does in `train_step`; it is to keras_wssi what
    `nsl.keras.adversarial_loss` is to Neural Structured Learning.

    Args:
        model: the `keras.Model` (any kind) producing logits.
        penalties: `Penalty` objects (create them once, outside the loop).
        x, y, sample_weight: the batch.
        training: the mode of the forward pass; stateful penalties update their state only when True.

    Returns:
        `PenaltyLoss(total, values, y_pred)`.

    Example:

    ```python
    penalties = [keras_wssi.penalties.InputGradient(0.1), keras_wssi.penalties.get("weissi:1e-3")]
    with tf.GradientTape() as tape:
        result = keras_wssi.penalty_loss(model, penalties, x, y)
        loss = loss_fn(y, result.y_pred) + result.total
    grads = tape.gradient(loss, model.trainable_variables)
    ```
    """
    penalties = check_penalties(penalties)
    for penalty in penalties:
        penalty.check_model(model)
    input_jacobian = None
    if any("input_jacobian" in p.requires for p in penalties):
        x, y_pred, input_jacobian = backend.forward_with_input_jacobian(model, x, training)
    else:
        y_pred = model(x, training=training)
    context = PenaltyContext(model, x, y, sample_weight, y_pred, training, input_jacobian=input_jacobian)
    total = keras.ops.zeros([], "float32")
    values = {}
    for penalty in penalties:
        value = penalty(context)
        values[penalty.name] = value
        if penalty.trains:
            total += keras.ops.cast(penalty.strength_variable, "float32") * value
    return PenaltyLoss(total, values, y_pred)
