"""`keras_wssi.Model`: a `keras.Model` whose `compile` takes penalties and whose steps add them to the loss.

Use it like `keras.Model` (functional, Sequential-style through `wrap`, or subclassing), then
`model.compile(optimizer, loss, metrics, regularizers=[...], jit_compile=True)`. Everything Keras users rely
on is kept: the step goes through `compute_loss` (so layer regularizers in `model.losses` count),
`sample_weight` and `train_on_batch` work, the loss is scaled under mixed precision and per replica under
`tf.distribute`, and each penalty's value is a metric of its own (progress bar, History, TensorBoard).
"""

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module
from keras.src.models.functional import Functional
from keras.src.models.functional import functional_from_config
from keras.src.models.model import functional_init_arguments

from keras_wssi import penalties as penalties_module
from keras_wssi.distribute import MultiWorkerFitFixes
from keras_wssi.penalties.base import PenaltyContext

__all__ = ["FunctionalModel", "Model", "WrappedModel", "wrap"]


class _PenaltySet:
    """Holds the compiled penalties and their metrics outside Keras's attribute tracking (so compiling a
    built model does not trip the layer's state lock, and the metrics are listed exactly once)."""

    def __init__(self, penalties, regularize_evaluation):
        self.penalties = list(penalties)
        self.trackers = [keras.metrics.Mean(name=p.name) for p in self.penalties]
        self.regularize_evaluation = bool(regularize_evaluation)

    @property
    def needs_input_jacobian(self):
        return any("input_jacobian" in p.requires for p in self.penalties)


@keras.saving.register_keras_serializable(package="keras_wssi")
class Model(MultiWorkerFitFixes, keras.Model):  # The mixin: fit under MultiWorkerMirroredStrategy (keras#20585).
    """A `keras.Model` trained with model-level penalties.

    Example:

    ```python
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(256, activation="relu")(x)
    model = keras_wssi.Model(inputs, keras.layers.Dense(10)(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], regularizers=["weissi:1e-3"], jit_compile=True)
    model.fit(x_train, y_train)   # History has "loss", "accuracy" and "weissi"
    ```
    """

    _keras_wssi_penalties = None

    def __new__(cls, *args, **kwargs):
        # `keras_wssi.Model(inputs, outputs)` builds a FunctionalModel. Keras would otherwise rewrite this
        # class's bases in place to insert `Functional` (keras.src.models.model.inject_functional_model_class),
        # which breaks every later subclassed `keras_wssi.Model` in the process.
        if cls is Model and functional_init_arguments(args, kwargs):
            return super().__new__(FunctionalModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if functional_init_arguments(args, kwargs) and not isinstance(self, Functional):
            raise TypeError(
                f"{type(self).__name__} subclasses keras_wssi.Model and was given inputs/outputs: build functional "
                "models as keras_wssi.Model(inputs, outputs), or subclass keras_wssi.FunctionalModel."
            )
        super().__init__(*args, **kwargs)

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
        regularizers=None,
        regularize_evaluation=True,
    ):
        """`keras.Model.compile`, plus:

        Args:
            regularizers: a list of penalties: `Penalty` objects, registered names (`"weissi"`),
                `"name:strength"` strings, `(name, strength)` pairs or serialized configs.
            regularize_evaluation: also compute the penalties in `evaluate` (their values are then logged
                as `val_<name>` during `fit`), as Keras does for layer regularization losses.
        """
        if regularizers is None:
            regularizers = []
        if not isinstance(regularizers, (list, tuple)):
            regularizers = [regularizers]
        penalties = [penalties_module.get(r) for r in regularizers]
        names = [p.name for p in penalties]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Penalty names must be unique (each is a metric), got duplicates {duplicates}: pass name=... "
                "to tell them apart."
            )
        if "loss" in names:
            raise ValueError("A penalty cannot be named 'loss': that metric is the total training objective.")
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        self._keras_wssi_penalties = _PenaltySet(penalties, regularize_evaluation)

    @property
    def penalties(self):
        """The compiled penalties, in order."""
        bundle = self._keras_wssi_penalties
        return list(bundle.penalties) if bundle is not None else []

    @property
    def metrics(self):
        metrics = super().metrics
        bundle = self._keras_wssi_penalties
        if self.compiled and bundle is not None:
            metrics = metrics + list(bundle.trackers)
        return metrics

    def _build_penalties(self):
        bundle = self._keras_wssi_penalties
        if bundle is None or not all(layer.built for layer in self._flatten_layers()):
            # A subclassed model without an input shape builds inside the first traced step; its penalties
            # are then built there too, on first use (tf.function allows state creation on the first trace).
            return
        for penalty in bundle.penalties:
            if not penalty.built:
                # Penalties create their state here, eagerly and under the model's distribution strategy,
                # before any step is traced.
                with self.distribute_strategy.scope():
                    penalty.build(self)

    def make_train_function(self, force=False):
        self._build_penalties()
        return super().make_train_function(force=force)

    def make_test_function(self, force=False):
        self._build_penalties()
        return super().make_test_function(force=force)

    def _forward_loss_and_penalties(self, x, y, sample_weight, training):
        bundle = self._keras_wssi_penalties
        active = bundle is not None and bundle.penalties and (training or bundle.regularize_evaluation)
        input_tape = None
        if active and bundle.needs_input_jacobian:
            if not tf.is_tensor(x) and not hasattr(x, "dtype"):
                raise ValueError(
                    "Input-Jacobian penalties need a model with a single tensor input, got inputs of type "
                    f"{type(x).__name__}."
                )
            x = tf.convert_to_tensor(x)
            if not x.dtype.is_floating:
                raise TypeError(
                    f"Input-Jacobian penalties differentiate with respect to the inputs, which must be floating "
                    f"point; got dtype {x.dtype.name}. Cast the data (e.g. images / 255) before fit()."
                )
            # Persistent, so every penalty can take its own vector-Jacobian products from this one forward pass.
            input_tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
            with input_tape:
                input_tape.watch(x)
                y_pred = self(x, training=training)
        else:
            y_pred = self(x, training=training)
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        values = []
        if active:
            context = PenaltyContext(self, x, y, sample_weight, y_pred, training, input_tape=input_tape)
            total = tf.zeros([], tf.float32)
            for penalty in bundle.penalties:
                value = penalty(context)
                values.append(value)
                if penalty.strength:
                    total += penalty.strength * value
            # Per-replica scaling, as Keras does for the compiled loss and `model.losses`.
            loss = loss + tf.cast(keras_loss_module.scale_loss_for_distribution(total), loss.dtype)
        return y_pred, loss, values

    def _update_penalty_metrics(self, values):
        bundle = self._keras_wssi_penalties
        for tracker, value in zip(bundle.trackers if bundle else [], values):
            tracker.update_state(value)

    def _batch_size(self, x):
        return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred, loss, values = self._forward_loss_and_penalties(x, y, sample_weight, training=True)
            self._loss_tracker.update_state(
                keras_loss_module.unscale_loss_for_distribution(loss), sample_weight=self._batch_size(x)
            )
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
        self._loss_tracker.update_state(
            keras_loss_module.unscale_loss_for_distribution(loss), sample_weight=self._batch_size(x)
        )
        self._update_penalty_metrics(values)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_compile_config(self):
        config = super().get_compile_config()
        bundle = self._keras_wssi_penalties
        if config and bundle is not None:
            config["regularizers"] = [penalties_module.serialize(p) for p in bundle.penalties]
            config["regularize_evaluation"] = bundle.regularize_evaluation
        return config

    def compile_from_config(self, config):
        config = dict(config)
        regularizers = [penalties_module.deserialize(c) for c in config.pop("regularizers", [])]
        regularize_evaluation = config.pop("regularize_evaluation", True)
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config, regularizers=regularizers, regularize_evaluation=regularize_evaluation)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)


@keras.saving.register_keras_serializable(package="keras_wssi")
class FunctionalModel(Model, Functional):
    """The functional form of `keras_wssi.Model` (what `keras_wssi.Model(inputs, outputs)` returns)."""

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return functional_from_config(cls, config, custom_objects=custom_objects)


@keras.saving.register_keras_serializable(package="keras_wssi")
class WrappedModel(Model):
    """A `keras_wssi.Model` that calls an existing model and shares its weights (see `wrap`)."""

    def __init__(self, model, **kwargs):
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        if not isinstance(model, keras.Model):
            raise TypeError(f"wrap() expects a keras.Model, got {type(model).__name__}.")
        kwargs.setdefault("name", f"regularized_{model.name}")
        super().__init__(**kwargs)
        self.wrapped = model
        self._keras_wssi_wrapped = model
        if model.built:
            self.built = True

    def build(self, input_shape):
        if not self.wrapped.built:
            self.wrapped.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.wrapped(inputs, training=training)

    def get_config(self):
        return {"model": keras.saving.serialize_keras_object(self.wrapped), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("model")), **config)


def wrap(model, name=None):
    """Returns a `keras_wssi.Model` that shares `model`'s layers and weights, ready for `compile(regularizers=...)`.

    Functional models and built Sequential models become a functional `keras_wssi.Model` over the same
    layers (so the structure module can read their graph); other models (subclassed, unbuilt Sequential)
    are called through a thin wrapper. Training the result trains `model` too.
    """
    if isinstance(model, Model):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"wrap() expects a keras.Model, got {type(model).__name__}.")
    name = name or f"regularized_{model.name}"
    is_graph = isinstance(model, keras.Sequential) and getattr(model, "_functional", None) is not None
    is_graph = is_graph or (not isinstance(model, keras.Sequential) and hasattr(model, "_nodes_by_depth"))
    if is_graph:
        inputs = model.inputs if len(model.inputs) > 1 else model.inputs[0]
        outputs = model.outputs if len(model.outputs) > 1 else model.outputs[0]
        return Model(inputs=inputs, outputs=outputs, name=name)
    return WrappedModel(model, name=name)
