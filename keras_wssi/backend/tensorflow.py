"""TensorFlow primitives of keras_wssi: the training step, the input tape, VJPs and JVPs, compiled functions,
random draws, replica scaling.

The Jacobian-vector product is written as the VJP of a VJP rather than with a forward-mode accumulator:
differentiating an accumulator with the weight tape makes XLA recompile on every step (DESIGN.md §3).
"""

import keras
import tensorflow as tf

# Keras's own per-replica loss scaling has no public API (keras.src.losses.loss is where the compiled loss and
# `model.losses` are scaled); using it keeps penalties scaled exactly like the losses Keras adds.
from keras.src.losses import loss as _keras_loss

__all__ = [
    "InputJacobian",
    "Trainer",
    "distributed",
    "forward_with_input_jacobian",
    "function",
    "grad",
    "is_traced",
    "replica_id",
    "scale_loss_for_distribution",
    "state_creation_scope",
    "stateless_normal",
    "unscale_loss_for_distribution",
    "vjp",
]


class InputJacobian:
    """Products with the per-example input Jacobian `J = ∂logits/∂x` of one forward pass.

    Args:
        tape: a persistent `tf.GradientTape` that watched `x` during the forward pass.
        x: the watched input batch.
        logits: the forward pass's output (any float dtype).
    """

    def __init__(self, tape, x, logits):
        self.tape = tape
        self.x = x
        self.logits = logits

    def vjp(self, cotangent):
        """`c_iᵀ J(x_i)` per example for cotangents `(B, C)`: a tensor shaped like `x`, float32, differentiable
        with respect to the weights (double backprop); no extra forward pass."""
        cotangent = tf.cast(cotangent, self.logits.dtype)
        result = self.tape.gradient(self.logits, self.x, output_gradients=cotangent)
        return tf.cast(result, tf.float32)

    def jvp(self, tangent):
        """`J u` per example, `(B, C)` float32, for tangents shaped like `x` (the VJP of a VJP)."""
        tangent = tf.cast(tangent, self.x.dtype)
        dummy = tf.zeros_like(self.logits)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(dummy)
            transposed = self.tape.gradient(self.logits, self.x, output_gradients=dummy)
        result = outer.gradient(transposed, dummy, output_gradients=tangent)
        return tf.cast(result, tf.float32)


def forward_with_input_jacobian(model, x, training):
    """Runs `model(x)` under a persistent tape that watches `x`; returns `(x, y_pred, InputJacobian)` (`x` as a tensor).

    Raises a clear error for inputs that cannot be differentiated (several inputs, integer dtypes).
    """
    if not tf.is_tensor(x) and not hasattr(x, "dtype"):
        raise ValueError(
            "Input-Jacobian penalties need a model with a single tensor input, got inputs of type "
            f"{type(x).__name__}."
        )
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise TypeError(
            "Input-Jacobian penalties differentiate with respect to the inputs, which must be floating point; got "
            f"dtype {x.dtype.name}. Cast the data (e.g. images / 255) before fit()."
        )
    # Persistent, so every penalty takes its own products from this one forward pass.
    tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
    with tape:
        tape.watch(x)
        y_pred = model(x, training=training)
    return x, y_pred, InputJacobian(tape, x, y_pred)


def stateless_normal(shape, seed):
    """Standard normal draws from a `(2,)` integer seed, Philox (the cheapest counter-based draw under XLA on
    CPU: ~0.07 ms against ~1 ms for Keras's default generator, DESIGN.md §3)."""
    seed = tf.cast(seed, tf.int64)
    return tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32, alg="philox")


def vjp(fn, *primals):
    """`(outputs, pullback)` with `pullback(cotangent)` the tuple of gradients with respect to `primals` (zeros
    where unconnected); differentiable with respect to the variables `fn` reads (a persistent tape)."""
    primals = tf.nest.map_structure(tf.convert_to_tensor, list(primals))
    tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
    with tape:
        for primal in tf.nest.flatten(primals):
            tape.watch(primal)
        outputs = fn(*primals)

    def pullback(cotangent):
        cotangent = tf.nest.map_structure(lambda c, o: tf.cast(c, o.dtype), cotangent, outputs)
        gradients = tape.gradient(
            outputs, primals, output_gradients=cotangent, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return tuple(gradients)

    return outputs, pullback


def grad(fn, *primals):
    """The gradients (a tuple, one per primal) of the sum of `fn(*primals)`'s outputs."""
    outputs, pullback = vjp(fn, *primals)
    return pullback(tf.nest.map_structure(tf.ones_like, outputs))


def function(fn, variables=(), jit_compile=True):
    """`fn` as a `tf.function` (XLA-compiled when `jit_compile`); it reads `variables` by reference, so weights
    changed between calls are seen."""
    del variables  # A tf.function captures variables by reference.
    return tf.function(fn, jit_compile=bool(jit_compile), reduce_retracing=True)


def is_traced(x=None):
    """Whether the code runs inside a `tf.function` trace (where tensors have no value)."""
    del x
    return not tf.executing_eagerly()


def distributed():
    """Whether a `tf.distribute` strategy is active (decided at trace time)."""
    return tf.distribute.has_strategy()


def state_creation_scope(model):
    """The scope under which penalty state is created: the model's distribution strategy."""
    return model.distribute_strategy.scope()


def replica_id():
    """The current replica's index (an int32 scalar tensor; 0 outside a distribution strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def scale_loss_for_distribution(value):
    """Divides by the number of replicas in sync, as Keras does for the compiled loss and `model.losses`."""
    return _keras_loss.scale_loss_for_distribution(value)


def unscale_loss_for_distribution(value):
    """The inverse of `scale_loss_for_distribution`."""
    return _keras_loss.unscale_loss_for_distribution(value)


class Trainer:
    """The TensorFlow step of `keras_wssi.Model`: `train_step(data)` with a `tf.GradientTape`, as Keras's
    TensorFlow trainer, with the penalties added to the loss (through the model's `_forward_loss_and_penalties`)."""

    def _batch_size(self, x):
        return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred, loss, values = self._forward_loss_and_penalties(x, y, sample_weight, training=True)
            self._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=self._batch_size(x))
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        trainable_weights = self.trainable_weights
        if trainable_weights:
            gradients = tape.gradient(loss, trainable_weights)
            self.optimizer.apply_gradients(zip(gradients, trainable_weights))
        self._update_penalty_metrics(values)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, loss, values = self._forward_loss_and_penalties(x, y, sample_weight, training=False)
        self._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=self._batch_size(x))
        self._update_penalty_metrics(values)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def eager_scope():
    """A context that lifts variable creation out of any `tf.function` being traced (`tf.init_scope`), so state
    created on first use inside a compiled step is an ordinary eager variable."""
    return tf.init_scope()


def variable_updates_persist(x=None):
    """Always True: on TensorFlow an `assign` to any Keras variable takes effect, also inside a compiled step."""
    del x
    return True


def supports_float64():
    """True: TensorFlow computes in float64 when asked."""
    return True


def accelerators():
    """The accelerator kinds TensorFlow sees (`["GPU"]`, `["TPU"]`, … or `[]`), without allocating device memory."""
    return sorted({d.device_type for d in tf.config.list_physical_devices() if d.device_type in ("GPU", "TPU")})
