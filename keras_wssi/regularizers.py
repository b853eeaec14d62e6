"""Per-layer `keras.Regularizer`s for the penalties that separate over layers (`kernel_regularizer=`).

Each is registered for serialization under the `keras_wssi` package and returns `strength · term(W)` for
one kernel, so `Σ_layers` of them equals the model-level penalty of the same name.
"""

import keras
import tensorflow as tf

from keras_wssi import linalg
from keras_wssi import validation

__all__ = ["DirectionL1", "LogNorm", "LpDecay", "SpectralNormRegularizer"]


@keras.saving.register_keras_serializable(package="keras_wssi")
class LpDecay(keras.Regularizer):
    """`strength · Σ |W|^p` (p = 2: weight decay, p = 1: L1), the ineffective family as a layer regularizer.

    Example:

    ```python
    keras.layers.Dense(64, kernel_regularizer=keras_wssi.regularizers.LpDecay(1e-4, p=2))
    ```
    """

    def __init__(self, strength=1e-4, p=2.0):
        self.strength = validation.strength(strength)
        self.p = validation.finite_float(p, "p", minimum=1.0)

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
        self.strength = validation.strength(strength)
        norm = linalg.validate_norm(norm)
        if norm == "spectral":
            raise ValueError(
                "LogNorm(norm='spectral') would need power-iteration state per layer; use the model-level "
                "keras_wssi.penalties.WEISSI(norm='spectral') instead."
            )
        self.norm = norm
        self.epsilon = validation.positive_float(epsilon, "epsilon")

    def __call__(self, x):
        value, _ = linalg.matrix_norm(tf.cast(x, tf.float32), self.norm, epsilon=self.epsilon)
        return self.strength * tf.math.log(value + self.epsilon)

    def get_config(self):
        return {"strength": self.strength, "norm": self.norm, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_wssi")
class DirectionL1(keras.Regularizer):
    """`strength · || W / ||W||_F ||_1`: the scale-invariant sparsity term of the direction of `W`."""

    def __init__(self, strength=1e-4, epsilon=1e-8):
        self.strength = validation.strength(strength)
        self.epsilon = float(epsilon)

    def __call__(self, x):
        x = tf.cast(x, tf.float32)
        return self.strength * tf.reduce_sum(tf.abs(x)) / linalg.safe_norm(x, epsilon=self.epsilon)

    def get_config(self):
        return {"strength": self.strength, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_wssi")
class SpectralNormRegularizer(keras.Regularizer):
    """`(strength / 2) · σ(W)²`: one layer's share of the layer-wise spectral upper bound (Yoshida & Miyato).

    Yoshida & Miyato, "Spectral Norm Regularization for Improving the Generalizability of Deep Learning"
    (arXiv 1705.10941): `σ(W)` by power iteration, `iterations` rounds per call, with the vector kept across
    steps (warm start), gradient `σ u vᵀ` (envelope theorem). Dense kernels, and convolution kernels reshaped to
    `(k_h k_w C_in, C_out)` as in the paper; with `conv_input_shape=(H, W, C_in)` a 2-D convolution kernel is
    instead measured by the true operator norm of the convolution on that input shape (power iteration through
    `conv2d` and `conv2d_transpose`, with `strides` and `padding`).

    The power-iteration vector is a non-trainable variable per kernel, created the first time the regularizer
    sees the kernel, lifted out of any `tf.function` (`tf.init_scope`), so it also works when Keras first calls
    the regularizer inside a traced or XLA-compiled `train_step`. Use one instance per layer. The model-level
    equivalent, which also reads each convolution's input shape, strides and padding from the model, is
    `keras_wssi.penalties.LayerwiseSpectralNorm`.

    Args:
        strength: λ; the value is `λ/2 · σ²`.
        iterations: power-iteration rounds per call (`>= 1`, 1 in the paper).
        conv_input_shape: `(H, W, C_in)` of the convolution's input, for the operator norm; None: reshaped kernel.
        strides, padding: the convolution's, with `conv_input_shape`.

    Example:

    ```python
    keras.layers.Dense(256, activation="relu",
                       kernel_regularizer=keras_wssi.regularizers.SpectralNormRegularizer(0.01))
    ```
    """

    def __init__(self, strength=0.01, iterations=1, conv_input_shape=None, strides=1, padding="same"):
        self.strength = validation.strength(strength)
        iterations = validation.positive_int(iterations, "iterations")
        self.iterations = iterations
        if conv_input_shape is not None:
            conv_input_shape = tuple(int(s) for s in conv_input_shape)
            if len(conv_input_shape) != 3 or min(conv_input_shape) < 1:
                raise ValueError(f"conv_input_shape must be (H, W, C_in) with positive sizes, got {conv_input_shape!r}.")
        self.conv_input_shape = conv_input_shape
        self.strides = tuple(strides) if isinstance(strides, (list, tuple)) else int(strides)
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")
        self.padding = padding.lower()
        self._states = {}

    def _state_for(self, kernel, shape):
        key = getattr(kernel, "path", None) or id(kernel)
        state = self._states.get(key)
        if state is None:
            # Lifted to the eager context: the first call may happen while Keras traces the train step.
            with tf.init_scope():
                initial = linalg.random_unit_rows(shape, [len(self._states), 31])
                state = keras.Variable(initial, trainable=False, name="spectral_norm_u")
            self._states[key] = state
        return state

    def __call__(self, x):
        kernel = tf.cast(x, tf.float32)
        if self.conv_input_shape is not None:
            if kernel.shape.rank != 4:
                raise ValueError(
                    f"conv_input_shape is for 2-D convolution kernels (rank 4), got a kernel of shape {kernel.shape}."
                )
            state = self._state_for(x, (1, *self.conv_input_shape))
            new_u, sigma = linalg.conv2d_operator_norm(
                kernel, state, strides=self.strides, padding=self.padding, iterations=self.iterations
            )
        else:
            matrices = linalg.kernel_matrices(kernel, "dense")
            state = self._state_for(x, tuple(matrices.shape[:2]))
            new_u, _, sigma_batch = linalg.power_iteration(matrices, state, iterations=self.iterations)
            sigma = tf.reduce_max(sigma_batch)
        state.assign(new_u)
        return 0.5 * self.strength * tf.square(sigma)

    def get_config(self):
        return {
            "strength": self.strength,
            "iterations": self.iterations,
            "conv_input_shape": self.conv_input_shape,
            "strides": self.strides,
            "padding": self.padding,
        }
