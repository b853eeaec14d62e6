"""Per-layer `keras.Regularizer`s for the penalties that separate over layers (`kernel_regularizer=`).

Each is registered for serialization under the `keras_wssi` package and returns `strength · term(W)` for
one kernel, so `Σ_layers` of them equals the model-level penalty of the same name.
"""

import keras
import numpy as np
from keras import ops

from keras_wssi import backend
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
        x = ops.cast(x, "float32")
        if self.p == 2.0:
            term = ops.sum(ops.square(x))
        elif self.p == 1.0:
            term = ops.sum(ops.abs(x))
        else:
            term = ops.sum(ops.power(ops.abs(x), self.p))
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
        value, _ = linalg.matrix_norm(ops.cast(x, "float32"), self.norm, epsilon=self.epsilon)
        return self.strength * ops.log(value + self.epsilon)

    def get_config(self):
        return {"strength": self.strength, "norm": self.norm, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_wssi")
class DirectionL1(keras.Regularizer):
    """`strength · || W / ||W||_F ||_1`: the scale-invariant sparsity term of the direction of `W`."""

    def __init__(self, strength=1e-4, epsilon=1e-8):
        self.strength = validation.strength(strength)
        self.epsilon = float(epsilon)

    def __call__(self, x):
        x = ops.cast(x, "float32")
        return self.strength * ops.sum(ops.abs(x)) / linalg.safe_norm(x, epsilon=self.epsilon)

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
    the convolution and its adjoint, with `strides` and `padding`).

    The power-iteration vector is a non-trainable variable per kernel, created the first time the regularizer
    sees the kernel. On TensorFlow it is lifted out of any `tf.function` (`tf.init_scope`), so it also works when
    Keras first calls the regularizer inside a traced or XLA-compiled `train_step`, and it is warm-started
    across steps. Use one instance per layer.

    **On JAX** Keras calls the regularizer inside its jitted, stateless train step with the kernel's value, not
    the variable: a variable cannot be created there, and an update of one that the model does not carry is
    dropped. The vector therefore persists only across eager calls (e.g. reading `model.losses` outside `fit`,
    which behave exactly as on TensorFlow). Inside the step the regularizer does not rely on a dropped update:
    it computes an accurate σ every step — the exact largest singular value (an SVD) of the reshaped kernel,
    or, for the convolution operator, subspace iteration with a block of 8 vectors run to convergence (relative
    change of σ below 1e-7, at most 500 rounds) from a fixed start (the kept vector if an eager call made one,
    plus seeded draws) — with the same envelope-theorem gradient. So on JAX the value under `fit` is σ itself,
    the value TensorFlow's warm-started estimate converges to (within a few steps for a clear spectral gap; the
    first steps on TensorFlow report under-estimates, and close top singular values of a convolution operator
    can take TensorFlow hundreds of rounds). An eager call on the variable on JAX starts its own vector, as on
    TensorFlow. Any call inside a `keras.StatelessScope` or a JAX transformation is of the in-step kind. The
    model-level equivalent, whose state is model state on every backend and which also
    reads each convolution's input shape, strides and padding from the model, is
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

    # The convolution operator's subspace iteration inside a JAX step: a block of `_BLOCK` vectors, stopped when
    # σ changes by less than `_TOLERANCE` (relative) in a round, or after `_MAX_ROUNDS` rounds.
    _BLOCK = 8
    _TOLERANCE = 1e-7
    _MAX_ROUNDS = 500

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

    @staticmethod
    def _key(kernel):
        return getattr(kernel, "path", None) or id(kernel)

    def _state_for(self, kernel, shape):
        key = self._key(kernel)
        state = self._states.get(key)
        if state is None:
            # Lifted to the eager context: the first call may happen while Keras traces the train step.
            with backend.eager_scope():
                initial = linalg.random_unit_rows(shape, [len(self._states), 31])
                state = keras.Variable(initial, trainable=False, name="spectral_norm_u")
            self._states[key] = state
        return state

    def _start(self, kernel, shape):
        """A start vector without creating or updating state: the kept vector if there is one, else a seeded draw
        (the draw the state would start from)."""
        state = self._states.get(self._key(kernel))
        if state is not None:
            return ops.convert_to_tensor(state.value)
        return ops.convert_to_tensor(linalg.random_unit_rows(shape, [len(self._states), 31]))

    def __call__(self, x):
        kernel = ops.cast(x, "float32")
        persistent = backend.variable_updates_persist(x)
        if self.conv_input_shape is not None:
            if len(kernel.shape) != 4:
                raise ValueError(
                    f"conv_input_shape is for 2-D convolution kernels (rank 4), got a kernel of shape {tuple(kernel.shape)}."
                )
            shape = (1, *self.conv_input_shape)
            if not persistent:
                return 0.5 * self.strength * ops.square(self._converged_conv_norm(kernel, self._start(x, shape)))
            state = self._state_for(x, shape)
            new_u, sigma = linalg.conv2d_operator_norm(
                kernel, state, strides=self.strides, padding=self.padding, iterations=self.iterations
            )
        else:
            matrices = linalg.kernel_matrices(kernel, "dense")
            if not persistent:
                return 0.5 * self.strength * ops.square(_exact_spectral_norm(matrices))
            state = self._state_for(x, tuple(matrices.shape[:2]))
            new_u, _, sigma_batch = linalg.power_iteration(matrices, state, iterations=self.iterations)
            sigma = ops.max(sigma_batch)
        state.assign(new_u)
        return 0.5 * self.strength * ops.square(sigma)

    def _converged_conv_norm(self, kernel, start):
        """σ of `h ↦ conv(h, kernel)` by subspace iteration to convergence; differentiable through the kernel only
        (`σ = vᵀ conv(u)` at the converged top singular vectors held constant).

        A block of `_BLOCK` vectors (the first is `start`, the others seeded draws) is iterated with `AᵀA` and
        re-orthonormalized; the Rayleigh–Ritz value of the block converges like `(σ_{k+1}/σ_1)^{2i}`, so it is
        also accurate when the top singular values are close (where single-vector power iteration crawls).
        """
        held = ops.stop_gradient(kernel)
        strides, padding = self.strides, self.padding
        in_shape = tuple(start.shape[1:])
        size = int(np.prod(in_shape))
        block = min(self._BLOCK, size)

        def conv(h, k):
            return ops.conv(h, k, strides, padding, data_format="channels_last")

        def flat(t):
            return ops.reshape(t, (ops.shape(t)[0], -1))

        def ritz(q):
            # q: (block, d) orthonormal rows. The top singular value and right vector of A restricted to span(q).
            images = flat(conv(ops.reshape(q, (block, *in_shape)), held))  # (block, m)
            values, vectors = ops.eigh(ops.matmul(images, ops.transpose(images)))  # ascending
            return ops.sqrt(ops.maximum(values[-1], 0.0)), vectors[:, -1], images

        def orthonormal(rows):
            q, _ = ops.qr(ops.transpose(rows))  # (d, block)
            return ops.transpose(q)

        def step(q):
            images = conv(ops.reshape(q, (block, *in_shape)), held)
            _, pullback = backend.vjp(lambda h: conv(h, held), ops.zeros((block, *in_shape), "float32"))
            return orthonormal(flat(pullback(images)[0]))

        def keep_going(i, q, sigma, previous):
            changing = ops.abs(sigma - previous) > self._TOLERANCE * ops.abs(sigma)
            return ops.logical_and(i < self._MAX_ROUNDS, changing)

        def body(i, q, sigma, previous):
            q = step(q)
            return i + 1, q, ritz(q)[0], sigma

        seeds = linalg.random_unit_rows((block, size), [block, 37])
        rows = ops.concatenate([ops.reshape(ops.cast(start, "float32"), (1, size)), ops.convert_to_tensor(seeds[1:])], 0)
        q = ops.stop_gradient(orthonormal(rows))
        sigma = ritz(q)[0]
        _, q, _, _ = ops.while_loop(keep_going, body, (ops.convert_to_tensor(0, "int32"), q, sigma, sigma * 0.0 - 1.0))
        _, coefficients, _ = ritz(q)
        u = ops.stop_gradient(ops.reshape(ops.matmul(coefficients[None, :], q), (1, *in_shape)))
        u = u / linalg.safe_norm(u)
        v = ops.stop_gradient(conv(u, held))
        v = v / linalg.safe_norm(v)
        return ops.sum(v * conv(u, kernel))

    def get_config(self):
        return {
            "strength": self.strength,
            "iterations": self.iterations,
            "conv_input_shape": self.conv_input_shape,
            "strides": self.strides,
            "padding": self.padding,
        }


def _exact_spectral_norm(matrices):
    """The largest singular value over a batch of matrices `(B, m, n)` from an SVD, differentiable as `uᵀ W v`
    with the top singular vectors held constant (the gradient `u vᵀ`, as power iteration's)."""
    u, _, vh = ops.svd(ops.stop_gradient(matrices), full_matrices=False)
    u, v = ops.stop_gradient(u[..., :, 0]), ops.stop_gradient(vh[..., 0, :])
    return ops.max(ops.einsum("bm,bmn,bn->b", u, matrices, v))
