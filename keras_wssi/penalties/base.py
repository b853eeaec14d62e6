"""The penalty interface shared by every family, where its state lives, and the registry of names.

A penalty is a small object: a non-negative `strength`, a `name` (also its metric name), `get_config`, and a
declaration `requires` of what it reads. The training loop (`keras_wssi.Model`, through
`keras_wssi.penalty_loss`) adds `strength * penalty(context)` to the loss, logs `penalty(context)` as the metric
`name`, and only pays for what some penalty requires: the input-Jacobian machinery is set up only when a
penalty lists `"input_jacobian"`.

**State is model state.** Everything a penalty keeps across steps — its strength, power-iteration and
warm-start vectors, the counter of its random draws — is a Keras variable held by a `PenaltyVariables` layer.
A `keras_wssi.Model` tracks that layer, so the variables are in `model.variables`, in `.keras` files, weight
checkpoints and backups, restored on load and placed by the distribution strategy. The strength is read from
its variable inside the compiled step, so changing `penalty.strength` (between or during `fit` calls, by a
schedule callback or a tuner) takes effect without retracing.
"""

import random
import warnings

import keras
import numpy as np

from keras_wssi import backend
from keras_wssi import validation
from keras_wssi.context import PenaltyContext

__all__ = [
    "Penalty",
    "PenaltyContext",
    "PenaltyVariables",
    "REQUIREMENTS",
    "RandomDirections",
    "register_alias",
    "register_penalty",
    "registered_penalties",
]

# The dtype of random-draw seeds and counters: int64 on TensorFlow; JAX runs in 32-bit mode by default (seeds
# are below 2**31 and the counter advances once per step).
SEED_DTYPE = "int64" if backend.BACKEND == "tensorflow" else "int32"

# What a penalty can declare in `requires`.
REQUIREMENTS = frozenset({"weights", "inputs", "labels", "logits", "input_jacobian"})


class PenaltyVariables(keras.layers.Layer):
    """The Keras variables of one penalty. It computes nothing: it exists so that a model tracks, saves,
    restores and distributes the penalty's state like any layer's weights.

    Variables are non-trainable and, under a distribution strategy, aggregated `only_first_replica` (every
    replica reads the same value; the first replica's update is kept), as deel-lip keeps its power-iteration
    vectors.
    """

    def __init__(self, name, **kwargs):
        super().__init__(name=name, trainable=False, **kwargs)
        self.built = True

    def add_state(self, name, shape, initializer, dtype="float32"):
        """A non-trainable variable of this penalty, created under the current distribution strategy."""
        # A layer's state is locked once it is built (it is, from the start: it has no `build`); penalties create
        # their state in their own `build(model)`, which may come later, so unlock for the duration, as Keras does
        # in `Layer.quantize`.
        self._tracker.unlock()
        try:
            return self.add_weight(
                shape=shape, initializer=initializer, dtype=dtype, trainable=False, name=name,
                aggregation="only_first_replica",
            )
        finally:
            self._tracker.lock()

    def load_own_variables(self, store):
        # A file written before penalties kept state (or by a model compiled without this penalty) has none: the
        # penalty then starts from its initial state, as it would in a new run, and says so.
        if store is None or len(store) == 0:
            if self.variables:
                warnings.warn(
                    f"No saved state for penalty {self.name!r} in the file being loaded: it starts from its initial "
                    "state (strength from its config).",
                    stacklevel=2,
                )
            return
        super().load_own_variables(store)

    def call(self, inputs):
        raise TypeError("PenaltyVariables holds a penalty's state and is not called.")


class Penalty:
    """Base class of model-level penalties.

    Subclasses set `default_name` and `requires`, implement `call(context)` returning a float32 scalar (the
    un-weighted value), and extend `get_config` with their own constructor arguments. State that must persist
    across steps is created in `build(model)` with `add_state`, which the training loop calls once, eagerly
    and under the model's distribution strategy, before the first step is traced (or in the first traced step
    for a subclassed model that is built there).

    Args:
        strength: the non-negative weight λ of the penalty in the loss. After the penalty is built it lives in
            a variable: assigning `penalty.strength = value` takes effect in the next step, without retracing.
        name: the metric name under which the value is logged; defaults to the penalty's config name.
    """

    default_name = "penalty"
    requires = frozenset({"weights"})
    # False for monitors whose value is only logged (their strength is always 0 and is not added to the loss).
    trains = True

    def __init__(self, strength=1.0, name=None):
        self._strength = validation.strength(strength)
        self.name = validation.metric_name(name if name is not None else self.default_name)
        self.built = False
        self._state = None
        self._strength_variable = None
        self._model = None
        unknown = set(self.requires) - REQUIREMENTS
        if unknown:
            raise ValueError(f"{type(self).__name__}.requires has unknown entries {sorted(unknown)}.")

    # ------------------------------------------------------------------------------------------------ strength

    @property
    def strength(self):
        """λ, a Python float (read from its variable once the penalty is built)."""
        if self._strength_variable is not None and not backend.is_traced(self._strength_variable):
            value = float(keras.ops.convert_to_numpy(self._strength_variable))
            # The variable is float32: report the value as given while it is unchanged (configs stay exact).
            if value != float(np.float32(self._strength)):
                self._strength = value
        return self._strength

    @strength.setter
    def strength(self, value):
        value = validation.strength(value)
        if not self.trains and value != 0.0:
            raise ValueError(f"{self.name}: the strength of a monitor must stay 0 (it only logs), got {value!r}.")
        self._strength = value
        if self._strength_variable is not None:
            # On JAX, `fit` holds the variables' values in its own state during an epoch; write that state back
            # first, so the assignment is not overwritten and the next step reads it (as a callback's `self.model`
            # access does).
            sync = getattr(self._model, "jax_state_sync", None)
            if sync is not None:
                sync()
            self._strength_variable.assign(value)

    @property
    def strength_variable(self):
        """The variable the compiled step reads λ from (None before `build`)."""
        return self._strength_variable

    # --------------------------------------------------------------------------------------------------- state

    @property
    def state(self):
        """The `PenaltyVariables` layer holding this penalty's variables (created on first use)."""
        if self._state is None:
            self._state = PenaltyVariables(name=self.name)
        return self._state

    @property
    def variables(self):
        """Every variable of the penalty (its strength first)."""
        return list(self._state.variables) if self._state is not None else []

    def add_state(self, name, shape, initializer="zeros", dtype="float32"):
        """Creates a non-trainable variable of this penalty (see `PenaltyVariables`)."""
        if callable(initializer) and not isinstance(initializer, keras.initializers.Initializer):
            function = initializer
            initializer = lambda shape, dtype=None: function(shape, dtype)  # noqa: E731
        elif isinstance(initializer, np.ndarray):
            value = initializer
            initializer = lambda shape, dtype=None: keras.ops.convert_to_tensor(value, dtype=dtype)  # noqa: E731
        return self.state.add_state(name, shape, initializer, dtype=dtype)

    def build(self, model):
        """Reads what the penalty needs from `model` (already built) and creates its state. Subclasses create
        their own state, then call `super().build(model)`."""
        if self._strength_variable is None:
            value = self._strength
            self._strength_variable = self.add_state(
                "strength", (), lambda shape, dtype=None: keras.ops.convert_to_tensor(value, dtype=dtype or "float32")
            )
        self._model = model
        self.built = True

    def check_model(self, model):
        """Raises if this penalty was built for another model (its state reads that model's weights)."""
        if self.built and self._model is not None and model is not None and self._model is not model:
            raise ValueError(
                f"Penalty {self.name!r} was built for model {self._model.name!r} and cannot also regularize "
                f"{model.name!r}: its state belongs to the first model. Use a new penalty, e.g. "
                f"`type(penalty).from_config(penalty.get_config())`."
            )

    def call(self, context):
        raise NotImplementedError(f"{type(self).__name__} must implement call(context).")

    def __call__(self, context):
        if not self.built:
            self.build(context.model)
        return keras.ops.cast(self.call(context), "float32")

    def get_config(self):
        return {"strength": self.strength, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class RandomDirections(Penalty):
    """A penalty that draws random vectors every step: a counter-based (Philox) draw from a seed kept in a
    variable, so draws compile under XLA without retracing and a resumed run continues the same sequence.

    Under a distribution strategy each replica draws its own vectors (the replica index is folded into the
    seed); the counter advances once per draw, so a resumed run continues the same sequence.

    Args:
        seed: an int, or None for a seed drawn from Python's `random` (deterministic under
            `keras.utils.set_random_seed`).
    """

    def __init__(self, seed=None, **kwargs):
        self.seed = validation.optional_seed(seed)
        self._seed_state = None
        super().__init__(**kwargs)

    def build(self, model):
        if self._seed_state is None:
            seed = self.seed if self.seed is not None else random.randint(1, 2**31 - 1)
            self._seed_state = self.add_state(
                "seed", (2,), lambda shape, dtype=None: keras.ops.convert_to_tensor([seed, 0], dtype=dtype), dtype=SEED_DTYPE
            )
        super().build(model)

    def normal(self, shape):
        """Standard normal draws of `shape` for this step (advances the counter)."""
        counter = self._seed_state.value
        seed = counter
        if backend.distributed():  # Decided at trace time: no extra ops on a single device.
            offset = keras.ops.cast(backend.replica_id(), SEED_DTYPE) * (2**32)
            seed = counter + keras.ops.stack([keras.ops.zeros((), SEED_DTYPE), offset])
        draw = backend.stateless_normal(shape, seed)
        self._seed_state.assign_add(keras.ops.convert_to_tensor([0, 1], SEED_DTYPE))
        return draw


# Config name → (penalty class, default constructor arguments). Filled by `register_penalty`/`register_alias`.
_REGISTRY = {}


def register_penalty(config_name):
    """Class decorator: registers a penalty under `config_name` for `keras_wssi.penalties.get`, and with
    Keras serialization under the `keras_wssi` package."""

    def decorator(cls):
        cls = keras.saving.register_keras_serializable(package="keras_wssi", name=cls.__name__)(cls)
        register_alias(config_name, cls)
        return cls

    return decorator


def register_alias(config_name, cls, **defaults):
    """Registers `config_name` as `cls(**defaults)` (e.g. `"weissi_product"` → `WEISSI(form="product")`)."""
    if config_name in _REGISTRY and _REGISTRY[config_name][0] is not cls:
        raise ValueError(f"Penalty name {config_name!r} is registered twice.")
    _REGISTRY[config_name] = (cls, dict(defaults))


def registered_penalties():
    """A copy of the registry: config name → (class, default arguments)."""
    return dict(_REGISTRY)
