"""JAX primitives of keras_wssi: the training step, input-Jacobian products, VJPs, compiled functions, draws.

The step follows Keras's own JAX trainer (`keras/src/backend/jax/trainer.py`): Keras differentiates
`compute_loss_and_updates` with `jax.value_and_grad`; `Trainer` overrides that one method so the penalties run
inside it, in a `keras.StatelessScope` that maps every model variable (weights, penalty state, metrics) to the
step's values and collects their updates. Penalty code therefore reads and assigns Keras variables exactly as
on TensorFlow.

Input-Jacobian products reuse the step's forward pass: the pass runs once under `jax.vjp`, whose pullback is the
VJP `cᵀ J`; its linear transpose (`jax.linear_transpose`) is the JVP `J u`, evaluated from the same
linearization (no second forward pass). Both are differentiable with respect to the weights.

`KERAS_WSSI_JAX_JVP=forward` (read at import) makes `jvp` a true forward-mode product instead (`jax.jvp`, which
reruns the forward pass with tangents); `benchmarks/step_overhead.py --jax_jvp=transpose,forward` times both.
"""

import contextlib
import os

import jax
import jax.numpy as jnp
import keras

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


# How `InputJacobian.jvp` is computed: "transpose" (of the VJP, from the step's own pass) or "forward" (jax.jvp).
JVP_MODE = os.environ.get("KERAS_WSSI_JAX_JVP", "transpose")
if JVP_MODE not in ("transpose", "forward"):
    raise ValueError(f"KERAS_WSSI_JAX_JVP must be 'transpose' or 'forward', got {JVP_MODE!r}.")


def _is_float(dtype):
    return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)


class InputJacobian:
    """Products with the per-example input Jacobian `J = ∂logits/∂x` of one forward pass.

    Args:
        pullback: the `jax.vjp` pullback of `x ↦ logits`.
        x: the input batch.
        logits: the forward pass's output.
        forward: `x ↦ logits` itself (used by forward-mode JVPs, `KERAS_WSSI_JAX_JVP=forward`).
    """

    def __init__(self, pullback, x, logits, forward=None):
        self.pullback = pullback
        self.x = x
        self.logits = logits
        self.forward = forward
        self._transposed = None

    def vjp(self, cotangent):
        """`c_iᵀ J(x_i)` per example for cotangents `(B, C)`: shaped like `x`, float32, differentiable with respect
        to the weights; no extra forward pass."""
        (result,) = self.pullback(jnp.asarray(cotangent, self.logits.dtype))
        return jnp.asarray(result, jnp.float32)

    def jvp(self, tangent):
        """`J u` per example, `(B, C)` float32, for tangents shaped like `x` (the transpose of the VJP)."""
        if JVP_MODE == "forward" and self.forward is not None:
            _, result = jax.jvp(self.forward, (self.x,), (jnp.asarray(tangent, self.x.dtype),))
            return jnp.asarray(result, jnp.float32)
        if self._transposed is None:
            self._transposed = jax.linear_transpose(self.pullback, jnp.zeros_like(self.logits))
        (result,) = self._transposed((jnp.asarray(tangent, self.x.dtype),))
        return jnp.asarray(result, jnp.float32)


def _call_kwargs(model, training):
    return {"training": training} if getattr(model, "_call_has_training_arg", True) else {}


def forward_with_input_jacobian(model, x, training):
    """Runs `model(x)` under `jax.vjp` with respect to `x`; returns `(x, y_pred, InputJacobian)`.

    The model runs statelessly on the current values of its variables (inside a training step: the step's
    values); its state updates (e.g. BatchNorm statistics) are assigned back, and the losses its layers add
    (activity regularization) are handed to the model's next `compute_loss`, as Keras's JAX trainer does.
    """
    if isinstance(x, (list, tuple, dict)) or not hasattr(x, "dtype"):
        raise ValueError(
            "Input-Jacobian penalties need a model with a single tensor input, got inputs of type "
            f"{type(x).__name__}."
        )
    x = jnp.asarray(x)
    if not _is_float(x.dtype):
        raise TypeError(
            "Input-Jacobian penalties differentiate with respect to the inputs, which must be floating point; got "
            f"dtype {x.dtype.name}. Cast the data (e.g. images / 255) before fit()."
        )
    if not model.built:
        model(x[:1], training=False)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    kwargs = _call_kwargs(model, training)

    def forward(inputs):
        outputs, updated, losses = model.stateless_call(trainable, non_trainable, inputs, return_losses=True, **kwargs)
        return outputs, (updated, losses)

    y_pred, pullback, (updated, losses) = jax.vjp(forward, x, has_aux=True)
    for variable, old, new in zip(model.non_trainable_variables, non_trainable, updated):
        if new is not None and new is not old:
            variable.assign(new)
    if losses:
        model._losses_override.clear()
        model._losses_override = list(losses)
    return x, y_pred, InputJacobian(pullback, x, y_pred, forward=lambda inputs: forward(inputs)[0])


def vjp(fn, *primals):
    """`(outputs, pullback)` with `pullback(cotangent)` the tuple of gradients with respect to `primals`."""
    primals = [jax.tree_util.tree_map(jnp.asarray, p) for p in primals]
    outputs, pullback = jax.vjp(fn, *primals)

    def cast_pullback(cotangent):
        cotangent = jax.tree_util.tree_map(lambda c, o: jnp.asarray(c, o.dtype), cotangent, outputs)
        return pullback(cotangent)

    return outputs, cast_pullback


def grad(fn, *primals):
    """The gradients (a tuple, one per primal) of the sum of `fn(*primals)`'s outputs."""
    outputs, pullback = vjp(fn, *primals)
    return pullback(jax.tree_util.tree_map(jnp.ones_like, outputs))


def function(fn, variables=(), jit_compile=True):
    """`fn` compiled with `jax.jit`; the current values of `variables` are passed in on every call (a stateless
    scope maps them), so weights changed between calls are seen. Updates `fn` makes to variables are discarded."""
    variables = list(variables)

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    compiled = jax.jit(stateless) if jit_compile else stateless

    def call(*args):
        return compiled([v.value for v in variables], *args)

    call.python_function = fn
    return call


def is_traced(x=None):
    """Whether `x` (a tensor or Keras variable) is an abstract value inside a JAX transformation."""
    if isinstance(x, keras.Variable):
        x = x.value
    return isinstance(x, jax.core.Tracer)


def stateless_normal(shape, seed):
    """Standard normal draws from a `(2,)` integer seed (threefry: JAX's default counter-based generator)."""
    return jax.random.normal(_key(seed), tuple(shape), jnp.float32)


def _key(seed):
    seed = jnp.asarray(seed)
    return jax.random.fold_in(jax.random.key(seed[0].astype(jnp.uint32)), seed[1].astype(jnp.uint32))


def distributed():
    """Always False: `keras.distribution` compiles one global program, so nothing is per replica."""
    return False


def replica_id():
    """0: under `keras.distribution` the step is one global (sharded) program."""
    return jnp.zeros((), jnp.int32)


def scale_loss_for_distribution(value):
    """The identity: the JAX step computes the global batch's loss."""
    return value


def unscale_loss_for_distribution(value):
    """The identity (see `scale_loss_for_distribution`)."""
    return value


def state_creation_scope(model):
    """Variables created eagerly are laid out by the active `keras.distribution`; no extra scope is needed."""
    del model
    return contextlib.nullcontext()


class Trainer:
    """The JAX step of `keras_wssi.Model`: Keras's JAX trainer with the penalties added inside
    `compute_loss_and_updates` (which Keras's `train_step(state, data)` and `test_step(state, data)` call)."""

    def compute_loss_and_updates(
        self,
        trainable_variables,
        non_trainable_variables,
        metrics_variables,
        x,
        y,
        sample_weight,
        training=False,
        optimizer_variables=None,
    ):
        if not self._penalties_active(training):
            return super().compute_loss_and_updates(
                trainable_variables, non_trainable_variables, metrics_variables, x, y, sample_weight,
                training=training, optimizer_variables=optimizer_variables,
            )
        mapping = (
            list(zip(self.trainable_variables, trainable_variables))
            + list(zip(self.non_trainable_variables, non_trainable_variables))
            + list(zip(self.metrics_variables, metrics_variables))
        )
        try:
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
                y_pred, loss, values = self._forward_loss_and_penalties(x, y, sample_weight, training)
                self._update_penalty_metrics(values)
        finally:
            self._losses_override.clear()
        non_trainable_variables = [scope.get_current_value(v) for v in self.non_trainable_variables]
        metrics_variables = [scope.get_current_value(v) for v in self.metrics_variables]
        unscaled_loss = loss
        if training and self.optimizer is not None:
            with keras.StatelessScope(state_mapping=list(zip(self.optimizer.variables, optimizer_variables))):
                loss = self.optimizer.scale_loss(loss)
        return loss, (unscaled_loss, y_pred, non_trainable_variables, metrics_variables)


def eager_scope():
    """A no-op context: a JAX trace cannot be left, so state cannot be created inside one (see
    `variable_updates_persist`)."""
    return contextlib.nullcontext()


def variable_updates_persist(x=None):
    """Whether an `assign` made now to a variable that the surrounding step does not carry (e.g. a regularizer's
    own state) takes effect: only outside JAX transformations and outside a `keras.StatelessScope` (Keras's JAX
    train step runs in one and keeps only the updates of the model's variables). `x`: a value the caller is
    handed (a tracer means a transformation is under way)."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return not is_traced(x) and not in_stateless_scope()


def supports_float64():
    """Whether float64 is available: only with `jax_enable_x64` (off by default; float64 requests then give
    float32)."""
    return bool(jax.config.jax_enable_x64)


def accelerators():
    """The accelerator kinds JAX sees (`["GPU"]`, `["TPU"]` or `[]`)."""
    return sorted({"TPU" if d.platform == "tpu" else "GPU" for d in jax.devices() if d.platform != "cpu"})
