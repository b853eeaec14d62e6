"""Linear algebra on tensors: guarded norms, kernel matrices and power iteration.

Tensors in, tensors out; nothing here knows about Keras models. Every norm is guarded so that its value
and gradient stay finite at zero (the gradient of `sqrt` at 0 is infinite, DESIGN.md §3).
"""

import tensorflow as tf

__all__ = [
    "NORMS",
    "entrywise_norm",
    "kernel_matrices",
    "l2_normalize",
    "matrix_norm",
    "power_iteration",
    "safe_norm",
    "validate_norm",
]

# Norm names accepted by `matrix_norm`; a float p >= 1 selects the entrywise p-norm.
NORMS = ("frobenius", "spectral")


def validate_norm(norm, argument="norm"):
    """Returns `norm` as `"frobenius"`, `"spectral"` or a float `p >= 1`, or raises a clear error."""
    if isinstance(norm, str):
        if norm in ("fro", "frobenius", "l2"):
            return "frobenius"
        if norm in ("spectral", "operator", "2-operator"):
            return "spectral"
        raise ValueError(f"{argument} must be 'frobenius', 'spectral' or a number p >= 1, got {norm!r}.")
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        raise TypeError(f"{argument} must be 'frobenius', 'spectral' or a number p >= 1, got {norm!r}.")
    if not float(norm) >= 1.0:
        raise ValueError(f"{argument}: the entrywise p-norm needs p >= 1 (convex, finite gradient), got {norm!r}.")
    return float(norm)


def safe_norm(x, axis=None, keepdims=False, epsilon=1e-12):
    """Euclidean norm `sqrt(Σ x² + ε²)`: equal to `||x||` up to ε, with a finite gradient (0) at x = 0."""
    x = tf.convert_to_tensor(x)
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=keepdims) + tf.cast(epsilon * epsilon, x.dtype))


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """`x / ||x||` along `axis`, guarded at zero."""
    return x / safe_norm(x, axis=axis, keepdims=True, epsilon=epsilon)


def entrywise_norm(x, p, epsilon=1e-12):
    """`(Σ |x|^p)^(1/p)` for `p >= 1`, guarded at zero."""
    x = tf.convert_to_tensor(x)
    if p == 2.0:
        return safe_norm(x, epsilon=epsilon)
    if p == 1.0:
        return tf.reduce_sum(tf.abs(x))
    total = tf.reduce_sum(tf.pow(tf.abs(x), p)) + tf.cast(epsilon**p, x.dtype)
    return tf.pow(total, 1.0 / p)


def kernel_matrices(kernel, kind="dense"):
    """The kernel as a batch of matrices `(B, fan_in, fan_out)` whose largest spectral norm bounds the layer.

    Dense and convolution kernels give one matrix `(∏ kernel_size · C_in, C_out)` (the reshaping of
    Yoshida & Miyato 2017); a depthwise kernel `(k…, C_in, M)` gives one `(∏ k, M)` matrix per input
    channel, since channels do not mix.
    """
    kernel = tf.convert_to_tensor(kernel)
    if kind == "depthwise_conv":
        spatial = int(tf.reduce_prod(kernel.shape[:-2]))
        channels, multiplier = kernel.shape[-2], kernel.shape[-1]
        matrices = tf.reshape(kernel, [spatial, channels, multiplier])
        return tf.transpose(matrices, [1, 0, 2])
    return tf.reshape(kernel, [1, -1, kernel.shape[-1]])


def power_iteration(matrices, u, iterations=1, epsilon=1e-12):
    """Power iteration for the largest singular value of each matrix in a batch.

    Args:
        matrices: `(B, m, n)`.
        u: `(B, m)` start vectors (left singular vector estimates), e.g. kept from the previous step.
        iterations: number of `u → v → u` rounds (unrolled: a few fixed rounds compile best under XLA).

    Returns:
        `(u, v, sigma)`: the updated singular vector estimates (gradient stopped) and
        `sigma = uᵀ W v` per matrix, differentiable through `W` only (the envelope theorem: at the fixed
        point, the derivative of σ is `u vᵀ`).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    held = tf.stop_gradient(matrices)
    u = tf.stop_gradient(u)
    v = None
    for _ in range(iterations):
        v = l2_normalize(tf.einsum("bm,bmn->bn", u, held), epsilon=epsilon)
        u = l2_normalize(tf.einsum("bmn,bn->bm", held, v), epsilon=epsilon)
    u, v = tf.stop_gradient(u), tf.stop_gradient(v)
    sigma = tf.einsum("bm,bmn,bn->b", u, matrices, v)
    return u, v, sigma


def matrix_norm(kernel, norm="frobenius", kind="dense", u=None, iterations=1, epsilon=1e-12):
    """A kernel's norm: Frobenius, spectral (of its kernel matrices, by power iteration from `u`) or
    entrywise p. Returns `(value, new_u)`; `new_u` is None except for the spectral norm."""
    norm = validate_norm(norm)
    if norm == "frobenius":
        return safe_norm(kernel, epsilon=epsilon), None
    if norm == "spectral":
        matrices = kernel_matrices(kernel, kind)
        if u is None:
            raise ValueError("The spectral norm needs start vectors `u` of shape (B, fan_in).")
        new_u, _, sigma = power_iteration(matrices, u, iterations=iterations, epsilon=epsilon)
        return tf.reduce_max(sigma), new_u
    return entrywise_norm(kernel, norm, epsilon=epsilon), None
