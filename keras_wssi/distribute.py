"""Workarounds that let `fit` run under `tf.distribute.MultiWorkerMirroredStrategy` (Keras 3.15.1).

Upstream bug: keras-team/keras#20585. Under `MultiWorkerMirroredStrategy`, Keras's TensorFlow trainer fails
before the first step, for a plain `keras.Model` too:

1. `TensorFlowTrainer._maybe_symbolic_build` takes the first batch of the distributed dataset and, when it
   is made of `PerReplica` values, reduces it with `strategy.reduce("MEAN", batch, axis=None)` — a
   cross-worker collective on *data*, issued eagerly, that fails (and is meaningless: it only needs shapes to
   build the model and optimizer).
2. `reduce_per_replica` then reduces the step's logs with `strategy.reduce("MEAN", v, axis=0)` in
   multi-worker mode, which fails for the scalar logs a train step returns (axis 0 does not exist).

`MultiWorkerFitFixes` fixes both with the smallest change: it builds from the local replica's batch, and it
gives every scalar log a leading axis of length 1 inside the distributed step, so that Keras's own
`reduce(..., axis=0)` averages the per-replica values into a scalar (the logs are already synchronised
across replicas, so the mean is the value). Outside multi-worker mode nothing changes.

Remove it when the installed Keras has the upstream fix.
"""

import keras
import tensorflow as tf

__all__ = ["MultiWorkerFitFixes", "in_multi_worker_mode"]


def in_multi_worker_mode(strategy):
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` running with more than one worker.

    Example:

    ```python
    keras_wssi.distribute.in_multi_worker_mode(tf.distribute.get_strategy())   # False on one process
    ```
    """
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def _with_leading_axis(logs):
    return tf.nest.map_structure(lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v, logs)


class MultiWorkerFitFixes:
    """Mixin for a `keras.Model` subclass: `fit`/`evaluate` under `MultiWorkerMirroredStrategy` (keras#20585).

    Put it before `keras.Model` in the bases. It overrides two private hooks of Keras's TensorFlow trainer
    (`_maybe_symbolic_build`, `_make_function`) and only acts when `in_multi_worker_mode` holds.

    Example:

    ```python
    class Model(keras_wssi.distribute.MultiWorkerFitFixes, keras.Model):
        ...
    ```
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or not in_multi_worker_mode(strategy) or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        # keras#20585 (1): build from this worker's own batch; a cross-worker reduction of data is not needed
        # (only shapes are) and fails eagerly.
        for _, _, batches in iterator:
            batch = next(batches)
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v,
                batch,
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _make_function(self, step_function):
        strategy = self._distribute_strategy
        if strategy is None or not in_multi_worker_mode(strategy):
            return super()._make_function(step_function)

        # keras#20585 (2): Keras reduces logs with reduce("MEAN", v, axis=0) in multi-worker mode; scalars get a
        # length-1 axis so that this reduction is defined (and returns the scalar).
        def step_with_leading_axis(data):
            return _with_leading_axis(step_function(data))

        return super()._make_function(step_with_leading_axis)


# Checked at import: the private hooks this mixin overrides must exist in the installed Keras (TensorFlow backend;
# on JAX, scale-out goes through `keras.distribution` and this mixin is not used).
_TRAINER = keras.Model.__mro__
if keras.backend.backend() == "tensorflow" and not all(any(hasattr(c, name) for c in _TRAINER) for name in ("_maybe_symbolic_build", "_make_function")):
    raise ImportError(
        "keras_wssi.distribute overrides Keras's TensorFlow trainer hooks _maybe_symbolic_build and _make_function, "
        f"which Keras {keras.__version__} does not have; update keras_wssi.distribute."
    )
