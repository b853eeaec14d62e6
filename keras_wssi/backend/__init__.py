"""The backend-specific primitives of a training step, behind one small interface.

Everything above this package (penalties, the training loop, analysis) is written once; only what differs
between Keras backends lives here, one module per backend, the way Keras splits its own trainers
(`keras/src/backend/<name>/trainer.py`):

- `forward_with_input_jacobian(model, x, training)`: the forward pass `(x, y_pred)`, plus an `InputJacobian` whose
  `vjp(c)` (`cᵀ J`) and `jvp(u)` (`J u`) reuse that pass and are differentiable with respect to the weights;
- `stateless_normal(shape, seed)`: a counter-based Gaussian draw from a `(2,)` integer seed tensor;
- `replica_id()`: the index of the current replica under a distribution strategy (0 otherwise);
- `scale_loss_for_distribution` / `unscale_loss_for_distribution`: per-replica loss scaling as Keras does it.

Only the TensorFlow backend is implemented; on another backend, importing keras_wssi works, and the first
use of a primitive raises an error that says so.
"""

import keras

__all__ = [
    "InputJacobian",
    "forward_with_input_jacobian",
    "replica_id",
    "scale_loss_for_distribution",
    "stateless_normal",
    "unscale_loss_for_distribution",
]

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from keras_wssi.backend.tensorflow import InputJacobian
    from keras_wssi.backend.tensorflow import forward_with_input_jacobian
    from keras_wssi.backend.tensorflow import replica_id
    from keras_wssi.backend.tensorflow import scale_loss_for_distribution
    from keras_wssi.backend.tensorflow import stateless_normal
    from keras_wssi.backend.tensorflow import unscale_loss_for_distribution
else:

    def _unsupported(*args, **kwargs):
        raise NotImplementedError(
            f"keras_wssi's training step runs on the TensorFlow backend; KERAS_BACKEND is {BACKEND!r}. "
            "Set KERAS_BACKEND=tensorflow before importing keras."
        )

    InputJacobian = forward_with_input_jacobian = replica_id = _unsupported
    scale_loss_for_distribution = stateless_normal = unscale_loss_for_distribution = _unsupported
