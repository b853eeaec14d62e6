"""The backend-specific primitives of keras_wssi, behind one small interface.

Everything above this package (penalties, the training loop, analysis, evaluation) is written once, in
`keras.ops`; only what differs between Keras backends lives here, one module per backend, the way Keras splits
its own trainers (`keras/src/backend/<name>/trainer.py`):

- `Trainer`: the mixin holding the training and evaluation step of `keras_wssi.Model` on this backend (it
  calls the model's backend-neutral `_forward_loss_and_penalties`);
- `forward_with_input_jacobian(model, x, training)`: the forward pass `(x, y_pred)`, plus an `InputJacobian` whose
  `vjp(c)` (`cᵀ J`) and `jvp(u)` (`J u`) reuse that pass and are differentiable with respect to the weights;
- `vjp(fn, *primals)`: `(outputs, pullback)`, `pullback(cotangent)` the gradients with respect to every primal
  (zeros where unconnected), differentiable with respect to anything `fn` reads (the weights);
- `grad(fn, *primals)`: the gradients of the sum of `fn`'s outputs;
- `function(fn, variables=(), jit_compile=True)`: `fn` compiled (a `tf.function` / `jax.jit`), reading the
  current values of `variables` (e.g. `model.variables`) on every call, so a changed weight is always seen;
- `stateless_normal(shape, seed)`: counter-based Gaussian draws from a `(2,)` integer seed tensor;
- `distributed()`, `replica_id()`, `scale_loss_for_distribution`, `unscale_loss_for_distribution`,
  `state_creation_scope(model)`: per-replica work under `tf.distribute` (no-ops on JAX, whose
  `keras.distribution` compiles one global program);
- `is_traced(x)`: whether `x` is a symbolic value inside a compiled function;
- `eager_scope()`: lifts state creation out of a trace where the backend can (`tf.init_scope`; a no-op on JAX);
- `variable_updates_persist(x)`: whether an `assign` to a variable the step does not carry takes effect now
  (always on TensorFlow; on JAX only outside transformations and stateless scopes);
- `supports_float64()`: whether float64 is computed (JAX: only with `jax_enable_x64`);
- `accelerators()`: the accelerator kinds the backend sees (`["GPU"]`, `["TPU"]` or `[]`).

TensorFlow and JAX are implemented; on another backend, importing keras_wssi works, and the first use of a
primitive raises an error that says so.
"""

import keras

__all__ = [
    "BACKEND",
    "InputJacobian",
    "SUPPORTED_BACKENDS",
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
    "eager_scope",
    "variable_updates_persist",
    "supports_float64",
    "accelerators",
]

BACKEND = keras.backend.backend()
SUPPORTED_BACKENDS = ("tensorflow", "jax")

if BACKEND == "tensorflow":
    from keras_wssi.backend.tensorflow import InputJacobian
    from keras_wssi.backend.tensorflow import Trainer
    from keras_wssi.backend.tensorflow import distributed
    from keras_wssi.backend.tensorflow import forward_with_input_jacobian
    from keras_wssi.backend.tensorflow import function
    from keras_wssi.backend.tensorflow import grad
    from keras_wssi.backend.tensorflow import is_traced
    from keras_wssi.backend.tensorflow import replica_id
    from keras_wssi.backend.tensorflow import scale_loss_for_distribution
    from keras_wssi.backend.tensorflow import state_creation_scope
    from keras_wssi.backend.tensorflow import stateless_normal
    from keras_wssi.backend.tensorflow import unscale_loss_for_distribution
    from keras_wssi.backend.tensorflow import vjp
    from keras_wssi.backend.tensorflow import eager_scope
    from keras_wssi.backend.tensorflow import variable_updates_persist
    from keras_wssi.backend.tensorflow import supports_float64
    from keras_wssi.backend.tensorflow import accelerators
elif BACKEND == "jax":
    from keras_wssi.backend.jax import InputJacobian
    from keras_wssi.backend.jax import Trainer
    from keras_wssi.backend.jax import distributed
    from keras_wssi.backend.jax import forward_with_input_jacobian
    from keras_wssi.backend.jax import function
    from keras_wssi.backend.jax import grad
    from keras_wssi.backend.jax import is_traced
    from keras_wssi.backend.jax import replica_id
    from keras_wssi.backend.jax import scale_loss_for_distribution
    from keras_wssi.backend.jax import state_creation_scope
    from keras_wssi.backend.jax import stateless_normal
    from keras_wssi.backend.jax import unscale_loss_for_distribution
    from keras_wssi.backend.jax import vjp
    from keras_wssi.backend.jax import eager_scope
    from keras_wssi.backend.jax import variable_updates_persist
    from keras_wssi.backend.jax import supports_float64
    from keras_wssi.backend.jax import accelerators
else:

    def _unsupported(*args, **kwargs):
        raise NotImplementedError(
            f"keras_wssi runs on the TensorFlow and JAX backends; KERAS_BACKEND is {BACKEND!r}. "
            "Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax before importing keras."
        )

    class Trainer:
        """Placeholder: fit/evaluate of a keras_wssi.Model raise on an unsupported backend."""

        def train_step(self, *args, **kwargs):
            _unsupported()

        def test_step(self, *args, **kwargs):
            _unsupported()

    InputJacobian = forward_with_input_jacobian = replica_id = distributed = _unsupported
    scale_loss_for_distribution = stateless_normal = unscale_loss_for_distribution = _unsupported
    function = grad = vjp = is_traced = state_creation_scope = _unsupported
    eager_scope = variable_updates_persist = supports_float64 = _unsupported
    accelerators = _unsupported
