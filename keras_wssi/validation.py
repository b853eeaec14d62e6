"""Argument validation shared by every public entry point: one place, one wording.

Each validator returns the value in canonical form (a Python `float`, `int`, …) or raises a `TypeError` /
`ValueError` whose message names the argument and says what is expected. Nothing here imports anything from
keras_wssi, so every layer of the package can use it (like Keras's own `validate_float_arg`).
"""

import math
import numbers

import numpy as np

__all__ = [
    "boolean",
    "choice",
    "finite_float",
    "metric_name",
    "non_negative_float",
    "optional_seed",
    "positive_float",
    "positive_int",
    "strength",
    "unit_interval",
]


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integer(value):
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def strength(value, argument="strength"):
    """A penalty or regularizer strength λ: a finite float >= 0."""
    if not _is_real(value):
        raise TypeError(f"{argument} must be a non-negative float, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{argument} must be a finite non-negative float, got {value!r}.")
    return value


def positive_int(value, argument, minimum=1):
    """An integer >= `minimum`."""
    if not _is_integer(value) or int(value) < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def positive_float(value, argument):
    """A finite number > 0."""
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{argument} must be a finite number > 0, got {value!r}.")
    return float(value)


def non_negative_float(value, argument):
    """A finite number >= 0."""
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{argument} must be a finite number >= 0, got {value!r}.")
    return float(value)


def finite_float(value, argument, minimum=None):
    """A finite number, optionally >= `minimum`."""
    if not _is_real(value) or not math.isfinite(float(value)) or (minimum is not None and float(value) < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{argument} must be a finite number{bound}, got {value!r}.")
    return float(value)


def unit_interval(value, argument):
    """A number in [0, 1)."""
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{argument} must be a number in [0, 1), got {value!r}.")
    return float(value)


def choice(value, choices, argument):
    """One of `choices` (compared with `==`)."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value


def boolean(value, argument):
    """`True` or `False` (not a truthy stand-in)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument} must be True or False, got {value!r}.")
    return bool(value)


def optional_seed(value, argument="seed"):
    """An integer seed, or None."""
    if value is not None and not _is_integer(value):
        raise TypeError(f"{argument} must be an int or None, got {value!r}.")
    return None if value is None else int(value)


def metric_name(value, argument="name"):
    """A metric name: a non-empty string of letters, digits and underscores."""
    if not isinstance(value, str) or not value or not value.replace("_", "").isalnum():
        raise ValueError(
            f"{argument} must be a non-empty string of letters, digits and underscores (it is a metric name), "
            f"got {value!r}."
        )
    return value
