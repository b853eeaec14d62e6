"""`keras_wssi.Model`: a `keras.Model` whose `compile` takes penalties and whose steps add them to the loss.

Use it like `keras.Model` (functional, Sequential-style through `wrap`, or subclassing), then
`model.compile(optimizer, loss, metrics, regularizers=[...], jit_compile=True)`. Everything Keras users rely
on is kept: the step goes through `compute_loss` (so layer regularizers in `model.losses` count),
`sample_weight` and `train_on_batch` work, the loss is scaled under mixed precision and per replica under
`tf.distribute`, and each penalty's value is a metric of its own (progress bar, History, TensorBoard).
"""

import keras
# No public alternative: `Functional` is the base class a functional subclass must have (Keras itself injects it
# into `keras.Model(inputs, outputs)`), and `functional_from_config` rebuilds such a subclass from its config.
from keras.src.models.functional import Functional
from keras.src.models.functional import functional_from_config

from keras_wssi import backend
from keras_wssi import penalties as penalties_module
from keras_wssi.distribute import MultiWorkerFitFixes
from keras_wssi.penalties.apply import check_penalties
from keras_wssi.penalties.apply import penalty_loss

__all__ = ["FunctionalModel", "Model", "WrappedModel", "wrap"]


# Names a penalty cannot take: they would overwrite Keras's own entries in History and the progress bar.
_RESERVED_NAMES = frozenset({"loss", "compile_metrics", "accuracy", "acc", "crossentropy", "ce"})


def _metric_names(metrics):
    """The log names of the metrics given to `compile` (strings, functions, Metric objects, nested lists or dicts)."""
    names = set()
    if metrics is None:
        return names
    if isinstance(metrics, dict):
        metrics = list(metrics.values())
    if not isinstance(metrics, (list, tuple)):
        metrics = [metrics]
    for metric in metrics:
        if isinstance(metric, (list, tuple, dict)):
            names |= _metric_names(metric)
        elif isinstance(metric, str):
            names.add(metric)
            names.add({"acc": "accuracy", "ce": "crossentropy"}.get(metric, metric))
        elif getattr(metric, "name", None):
            names.add(metric.name)
        elif getattr(metric, "__name__", None):
            names.add(metric.__name__)
    return names


# Keras cannot import a third-party package while loading a `.keras` file: a fresh process must `import keras_wssi`
# before `keras.models.load_model`. Keras's "Could not locate class" error prints the object's config, and this note
# is the config's first entry, so the error says exactly what to do.
LOAD_NOTE_KEY = "keras_wssi"
LOAD_NOTE = "saved by keras_wssi: run `import keras_wssi` before keras.models.load_model"


def functional_init_arguments(args, kwargs):
    """Whether `Model(*args, **kwargs)` asks for a functional model (inputs and outputs), as Keras decides it."""
    return (len(args) == 2) or (len(args) == 1 and "outputs" in kwargs) or ("inputs" in kwargs and "outputs" in kwargs)


class _PenaltySet:
    """Holds the compiled penalties and their metrics outside Keras's attribute tracking (so compiling a
    built model does not trip the layer's state lock, and the metrics are listed exactly once)."""

    def __init__(self, penalties, regularize_evaluation):
        self.penalties = list(penalties)
        self.trackers = [keras.metrics.Mean(name=p.name) for p in self.penalties]
        self.regularize_evaluation = bool(regularize_evaluation)


# The backend's training step; on TensorFlow also the fix for fit under MultiWorkerMirroredStrategy (keras#20585).
_BASES = (MultiWorkerFitFixes, backend.Trainer, keras.Model) if backend.BACKEND == "tensorflow" else (backend.Trainer, keras.Model)


@keras.saving.register_keras_serializable(package="keras_wssi")
class Model(*_BASES):
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
        penalties = check_penalties([penalties_module.get(r) for r in regularizers])
        names = [p.name for p in penalties]
        taken = (_RESERVED_NAMES | _metric_names(metrics) | _metric_names(weighted_metrics)) & set(names)
        prefixed = [n for n in names if n.startswith("val_")]
        if taken or prefixed:
            raise ValueError(
                f"Penalty names {sorted(taken | set(prefixed))} collide with metric names: a penalty's value is logged "
                "under its name (and 'val_<name>' in evaluation), which must not be 'loss', a compiled metric's name or "
                "start with 'val_'. Pass name=... to the penalty."
            )
        for penalty in penalties:
            penalty.check_model(self)
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
        self._track_penalty_state(penalties)
        self._build_penalties()

    def _track_penalty_state(self, penalties):
        """Makes every penalty's `PenaltyVariables` a tracked sub-layer, so its variables are model variables
        (saved, restored, distributed); replaces those of an earlier `compile`."""
        layers = [p.state for p in penalties]
        old = list(getattr(self, "_keras_wssi_state", None) or [])
        # The model's state is locked once built; Keras unlocks the same way to add state late (Layer.quantize).
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            for layer in old:
                if not any(layer is new for new in layers):
                    self._tracker.untrack(layer)
            self._keras_wssi_state = layers
        finally:
            if locked:
                self._tracker.lock()

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
                # Penalties create their state here, eagerly and under the model's distribution strategy, before
                # any step is traced (and before `load_model` restores the state).
                with backend.state_creation_scope(self):
                    penalty.build(self)

    def make_train_function(self, force=False):
        self._build_penalties()
        return super().make_train_function(force=force)

    def make_test_function(self, force=False):
        self._build_penalties()
        return super().make_test_function(force=force)

    def _penalties_active(self, training):
        bundle = self._keras_wssi_penalties
        return bool(bundle is not None and bundle.penalties and (training or bundle.regularize_evaluation))

    def _forward_loss_and_penalties(self, x, y, sample_weight, training):
        """The step's forward pass, loss (compiled loss + `model.losses` + scaled penalties) and penalty values;
        the backend's `Trainer` differentiates it."""
        bundle = self._keras_wssi_penalties
        if not self._penalties_active(training):
            y_pred = self(x, training=training)
            return y_pred, self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training), []
        result = penalty_loss(self, bundle.penalties, x, y, sample_weight, training=training)
        loss = self._compute_loss(x=x, y=y, y_pred=result.y_pred, sample_weight=sample_weight, training=training)
        # Per-replica scaling, as Keras does for the compiled loss and `model.losses`.
        loss = loss + keras.ops.cast(backend.scale_loss_for_distribution(result.total), loss.dtype)
        return result.y_pred, loss, list(result.values.values())

    def _update_penalty_metrics(self, values):
        bundle = self._keras_wssi_penalties
        for tracker, value in zip(bundle.trackers if bundle else [], values):
            tracker.update_state(value)

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

    def get_config(self):
        return {LOAD_NOTE_KEY: LOAD_NOTE, **super().get_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = {key: value for key, value in config.items() if key != LOAD_NOTE_KEY}
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
        return {LOAD_NOTE_KEY: LOAD_NOTE, "model": keras.saving.serialize_keras_object(self.wrapped), "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = {key: value for key, value in config.items() if key != LOAD_NOTE_KEY}
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
