"""The penalty interface shared by every family, and the context a penalty reads during a step.

A penalty is a small object: a non-negative `strength`, a `name` (also its metric name), `get_config`, and a
declaration `requires` of what it reads. The training loop (`keras_wssi.Model`) adds
`strength * penalty(context)` to the loss, logs `penalty(context)` as the metric `name`, and only pays for
what some penalty requires: the input Jacobian machinery (a tape that watches the inputs) is set up only when
a penalty lists `"input_jacobian"`.
"""

import math

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module

__all__ = ["Penalty", "PenaltyContext", "REQUIREMENTS", "register_alias", "register_penalty", "registered_penalties", "validate_strength"]

# What a penalty can declare in `requires`.
REQUIREMENTS = frozenset({"weights", "inputs", "labels", "logits", "input_jacobian"})


def validate_strength(strength, argument="strength"):
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"{argument} must be a non-negative float, got {strength!r} ({type(strength).__name__}).")
    strength = float(strength)
    if not math.isfinite(strength) or strength < 0.0:
        raise ValueError(f"{argument} must be a finite non-negative float, got {strength!r}.")
    return strength


def _validate_name(name):
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise ValueError(
            f"name must be a non-empty string of letters, digits and underscores (it is a metric name), got {name!r}."
        )
    return name


class Penalty:
    """Base class of model-level penalties.

    Subclasses set `default_name` and `requires`, implement `call(context)` returning a float32 scalar
    (the un-weighted value), and extend `get_config` with their own constructor arguments. State that must
    persist across steps (power-iteration vectors, say) is created in `build(model)`, which the training
    loop calls once, eagerly, before the first step is traced.

    Args:
        strength: the non-negative weight λ of the penalty in the loss.
        name: the metric name under which the value is logged; defaults to the penalty's config name.
    """

    default_name = "penalty"
    requires = frozenset({"weights"})

    def __init__(self, strength=1.0, name=None):
        self.strength = validate_strength(strength)
        self.name = _validate_name(name if name is not None else self.default_name)
        self.built = False
        unknown = set(self.requires) - REQUIREMENTS
        if unknown:
            raise ValueError(f"{type(self).__name__}.requires has unknown entries {sorted(unknown)}.")

    def build(self, model):
        """Reads what the penalty needs from `model` (already built) and creates its state."""
        self.built = True

    def call(self, context):
        raise NotImplementedError(f"{type(self).__name__} must implement call(context).")

    def __call__(self, context):
        if not self.built:
            self.build(context.model)
        return tf.cast(self.call(context), tf.float32)

    def get_config(self):
        return {"strength": self.strength, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class PenaltyContext:
    """What a penalty may read during one step.

    Attributes:
        model: the model being trained (a `keras.Model`).
        x: the input batch, as fed to the model.
        y: the targets (may be None).
        sample_weight: per-example weights (may be None).
        logits: the model's output on `x`, cast to float32.
        training: whether this is a training step.
    """

    def __init__(self, model, x, y, sample_weight, logits, training, input_tape=None):
        self.model = model
        self.x = x
        self.y = y
        self.sample_weight = sample_weight
        self.logits = tf.cast(logits, tf.float32) if logits is not None else None
        self._raw_logits = logits
        self.training = training
        self._input_tape = input_tape

    @property
    def batch_size(self):
        return tf.shape(self.logits)[0]

    def _require_jacobian(self):
        if self._input_tape is None:
            raise ValueError(
                "This penalty uses input-Jacobian products but does not declare 'input_jacobian' in its "
                "`requires`; the training loop only watches the inputs for penalties that ask for it."
            )
        if not tf.is_tensor(self.x):
            raise ValueError(
                "Input-Jacobian penalties need a model with a single tensor input; got inputs of type "
                f"{type(self.x).__name__}."
            )

    def vjp(self, cotangent):
        """Per-example vector-Jacobian product `cᵀ J` with `J = ∂logits/∂x`.

        Args:
            cotangent: `(batch, C)` tensor, one vector per example.

        Returns:
            A tensor shaped like `x`: row `i` is `c_iᵀ J(x_i)`. It is differentiable with respect to the
            weights (double backprop), and reuses the forward pass of the step: no extra forward.
        """
        self._require_jacobian()
        cotangent = tf.cast(cotangent, self._raw_logits.dtype)
        result = self._input_tape.gradient(self._raw_logits, self.x, output_gradients=cotangent)
        return tf.cast(result, tf.float32)

    def jvp(self, tangent):
        """Per-example Jacobian-vector product `J u`, written as the VJP of a VJP.

        A forward-mode accumulator is avoided on purpose: differentiating it with the weight tape makes
        XLA recompile every step (DESIGN.md §3). `u` must be shaped like `x`; returns `(batch, C)`.
        """
        self._require_jacobian()
        tangent = tf.cast(tangent, self.x.dtype)
        dummy = tf.zeros_like(self._raw_logits)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(dummy)
            transposed = self._input_tape.gradient(self._raw_logits, self.x, output_gradients=dummy)
        result = outer.gradient(transposed, dummy, output_gradients=tangent)
        return tf.cast(result, tf.float32)

    def forward(self, x, training=None):
        """Runs the model on other inputs (for penalties that probe nearby points), logits as float32."""
        if training is None:
            training = self.training
        return tf.cast(self.model(x, training=training), tf.float32)

    def compiled_loss(self, y_pred):
        """The loss given to `compile` (without `model.losses`) of predictions `y_pred` against this step's
        targets and sample weights, as a float32 scalar. Lets a penalty evaluate the training loss at other
        weights (e.g. sharpness-aware minimization) with the loss the user chose."""
        compiled = getattr(self.model, "_compile_loss", None)
        if compiled is None:
            raise ValueError("This penalty needs the compiled loss: pass `loss=` to `model.compile`.")
        # Keras scales the compiled loss by 1/replicas under tf.distribute; penalties are scaled once, by the
        # training loop, so return the per-replica loss unscaled.
        loss = keras_loss_module.unscale_loss_for_distribution(compiled(self.y, y_pred, self.sample_weight))
        return tf.cast(loss, tf.float32)

    def reduce_per_example(self, values):
        """Mean of per-example values, weighted by `sample_weight` when one is given."""
        values = tf.cast(values, tf.float32)
        if self.sample_weight is None:
            return tf.reduce_mean(values)
        weights = tf.cast(tf.reshape(self.sample_weight, [-1]), tf.float32)
        values = tf.reshape(values, [-1])
        return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))



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
