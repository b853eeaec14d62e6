"""Per-layer `keras.Regularizer`s for the penalties that separate over layers (`kernel_regularizer=`).

Each is registered for serialization under the `keras_wssi` package and returns `strength · term(W)` for
one kernel, so `Σ_layers` of them equals the model-level penalty of the same name.
"""

import keras
import tensorflow as tf

from keras_wssi import linalg
from keras_wssi.penalties.base import validate_strength

__all__ = ["DirectionL1", "LogNorm", "LpDecay"]


@keras.saving.register_keras_serializable(package="keras_wssi")
class LpDecay(keras.Regularizer):
    """`strength · Σ |W|^p` (p = 2: weight decay, p = 1: L1), the ineffective family as a layer regularizer.

    Example:

    ```python
    keras.layers.Dense(64, kernel_regularizer=keras_wssi.regularizers.LpDecay(1e-4, p=2))
    ```
    """

    def __init__(self, strength=1e-4, p=2.0):
        self.strength = validate_strength(strength)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not float(p) >= 1.0:
            raise ValueError(f"p must be a number >= 1, got {p!r}.")
        self.p = float(p)

    def __call__(self, x):
        x = tf.cast(x, tf.float32)
        if self.p == 2.0:
            term = tf.reduce_sum(tf.square(x))
        elif self.p == 1.0:
            term = tf.reduce_sum(tf.abs(x))
        else:
            term = tf.reduce_sum(tf.pow(tf.abs(x), self.p))
        return self.strength * term

    def get_config(self):
        return {"strength": self.strength, "p": self.p}


@keras.saving.register_keras_serializable(package="keras_wssi")
class LogNorm(keras.Regularizer):
    """`strength · log(||W|| + ε)`: one layer's share of the WEISSI log-product penalty `Σ_l log ||W_l||`.

    Summed over the layers of a positively homogeneous network, it is invariant under the weight scale
    shift (Liu et al., arXiv 2008.02965); its gradient `W / ||W||²` is an adaptive weight decay.

    Args:
        strength: λ.
        norm: `"frobenius"` or a number `p >= 1` (entrywise). For the spectral norm, which needs
            power-iteration state, use the model-level `keras_wssi.penalties.WEISSI(norm="spectral")`.
        epsilon: guard, so a zero kernel gives a finite value and gradient.
    """

    def __init__(self, strength=1e-3, norm="frobenius", epsilon=1e-8):
        self.strength = validate_strength(strength)
        norm = linalg.validate_norm(norm)
        if norm == "spectral":
            raise ValueError(
                "LogNorm(norm='spectral') would need power-iteration state per layer; use the model-level "
                "keras_wssi.penalties.WEISSI(norm='spectral') instead."
            )
        self.norm = norm
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"epsilon must be a positive number, got {epsilon!r}.")
        self.epsilon = float(epsilon)

    def __call__(self, x):
        value, _ = linalg.matrix_norm(tf.cast(x, tf.float32), self.norm, epsilon=self.epsilon)
        return self.strength * tf.math.log(value + self.epsilon)

    def get_config(self):
        return {"strength": self.strength, "norm": self.norm, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_wssi")
class DirectionL1(keras.Regularizer):
    """`strength · || W / ||W||_F ||_1`: the scale-invariant sparsity term of the direction of `W`."""

    def __init__(self, strength=1e-4, epsilon=1e-8):
        self.strength = validate_strength(strength)
        self.epsilon = float(epsilon)

    def __call__(self, x):
        x = tf.cast(x, tf.float32)
        return self.strength * tf.reduce_sum(tf.abs(x)) / linalg.safe_norm(x, epsilon=self.epsilon)

    def get_config(self):
        return {"strength": self.strength, "epsilon": self.epsilon}
