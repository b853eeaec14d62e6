"""Model-level penalties, one module per family, behind one small interface (`Penalty`).

`get` turns what a user writes in `compile(regularizers=[...])` into penalty objects:
a `Penalty` instance, a registered config name (`"weissi"`, `"l2"`, …), a `(name, strength)` pair, a
`"name:strength"` string, or a serialized config dict.
"""

import keras

from keras_wssi.penalties.base import REQUIREMENTS
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import PenaltyContext
from keras_wssi.penalties.base import register_alias
from keras_wssi.penalties.base import register_penalty
from keras_wssi.penalties.base import registered_penalties
from keras_wssi.penalties.curvature import CURE
from keras_wssi.penalties.jacobian import CrossLipschitz
from keras_wssi.penalties.jacobian import InputGradient
from keras_wssi.penalties.jacobian import JacobianFrobenius
from keras_wssi.penalties.jacobian import JacobianSpectralNorm
from keras_wssi.penalties.jacobian import JacobianSpectralNormError
from keras_wssi.penalties.jacobian import LayerwiseSpectralNorm
from keras_wssi.penalties.slope import SlopePenalty
from keras_wssi.penalties.weight_decay import WeightDecay
from keras_wssi.penalties.weight_perturbation import SharpnessAwareMinimization
from keras_wssi.penalties.weight_perturbation import WeightPerturbationLoss
from keras_wssi.penalties.weissi import WEISSI

__all__ = [
    "CURE",
    "CrossLipschitz",
    "InputGradient",
    "JacobianFrobenius",
    "JacobianSpectralNorm",
    "JacobianSpectralNormError",
    "LayerwiseSpectralNorm",
    "REQUIREMENTS",
    "Penalty",
    "PenaltyContext",
    "SharpnessAwareMinimization",
    "SlopePenalty",
    "WEISSI",
    "WeightDecay",
    "WeightPerturbationLoss",
    "deserialize",
    "get",
    "register_alias",
    "register_penalty",
    "registered_penalties",
    "serialize",
]


def _from_name(config_name, strength=None):
    registry = registered_penalties()
    if config_name not in registry:
        raise ValueError(
            f"Unknown penalty {config_name!r}: expected one of {', '.join(sorted(registry))}, "
            "a keras_wssi.penalties.Penalty instance, or a serialized penalty config."
        )
    cls, defaults = registry[config_name]
    kwargs = dict(defaults)
    if strength is not None:
        kwargs["strength"] = strength
    return cls(**kwargs)


def get(identifier):
    """Returns a `Penalty` for `identifier` (see the module docstring for the accepted forms)."""
    if isinstance(identifier, Penalty):
        return identifier
    if isinstance(identifier, str):
        if ":" in identifier:
            config_name, _, strength_text = identifier.partition(":")
            try:
                strength = float(strength_text)
            except ValueError:
                raise ValueError(
                    f"Penalty spec {identifier!r}: the strength after ':' must be a number, got {strength_text!r}."
                ) from None
            return _from_name(config_name.strip(), strength)
        return _from_name(identifier.strip())
    if isinstance(identifier, (tuple, list)) and len(identifier) == 2 and isinstance(identifier[0], str):
        return _from_name(identifier[0], identifier[1])
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise TypeError(
        f"Cannot interpret {identifier!r} ({type(identifier).__name__}) as a penalty: pass a Penalty, a "
        "registered name such as 'weissi', a (name, strength) pair, 'name:strength', or a config dict."
    )


def serialize(penalty):
    """Keras-serializes a penalty (class registered under the `keras_wssi` package)."""
    if not isinstance(penalty, Penalty):
        raise TypeError(f"serialize expects a Penalty, got {type(penalty).__name__}.")
    return keras.saving.serialize_keras_object(penalty)


def deserialize(config):
    """Inverse of `serialize`."""
    penalty = keras.saving.deserialize_keras_object(config)
    if not isinstance(penalty, Penalty):
        raise TypeError(f"Config {config!r} does not describe a keras_wssi penalty.")
    return penalty
