"""Model-level penalties, grouped by mechanism, behind one small interface (`Penalty`).

- `base`: the interface, penalty state (`PenaltyVariables`), random directions, the registry;
- `apply`: `penalty_loss`, the functional entry point the training loop uses too;
- weights only: `weissi` (WEISSI), `weight_decay` (L2/L1/Lp), `layerwise` (Yoshida & Miyato's bound);
- Jacobian products: `logit_jacobian` (what they share), `jacobian_norms` (input gradient, Jacobian Frobenius,
  cross-Lipschitz), `spectral` (the exact spectral norm and its monitor), `curvature` (CURE), `slope`;
- weight perturbations: `weight_perturbation` (the margin-bound loss, SAM).

`get` turns what a user writes in `compile(regularizers=[...])` into penalty objects:
a `Penalty` instance, a registered config name (`"weissi"`, `"l2"`, …), a `(name, strength)` pair, a
`"name:strength"` string, or a serialized config dict.
"""

import keras

from keras_wssi.penalties.apply import PenaltyLoss
from keras_wssi.penalties.apply import penalty_loss
from keras_wssi.penalties.base import REQUIREMENTS
from keras_wssi.penalties.base import Penalty
from keras_wssi.penalties.base import PenaltyContext
from keras_wssi.penalties.base import PenaltyVariables
from keras_wssi.penalties.base import RandomDirections
from keras_wssi.penalties.base import register_alias
from keras_wssi.penalties.base import register_penalty
from keras_wssi.penalties.base import registered_penalties
from keras_wssi.penalties.curvature import CURE
from keras_wssi.penalties.jacobian_norms import CrossLipschitz
from keras_wssi.penalties.jacobian_norms import InputGradient
from keras_wssi.penalties.jacobian_norms import JacobianFrobenius
from keras_wssi.penalties.layerwise import LayerwiseSpectralNorm
from keras_wssi.penalties.spectral import JacobianSpectralNorm
from keras_wssi.penalties.spectral import JacobianSpectralNormError
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
    "PenaltyLoss",
    "PenaltyVariables",
    "RandomDirections",
    "SharpnessAwareMinimization",
    "SlopePenalty",
    "WEISSI",
    "WeightDecay",
    "WeightPerturbationLoss",
    "deserialize",
    "get",
    "penalty_loss",
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
