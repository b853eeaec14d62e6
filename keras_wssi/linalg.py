"""Linear algebra on tensors: guarded norms, kernel matrices and power iteration.

Tensors in, tensors out; nothing here knows about Keras models. Every norm is guarded so that its value
and gradient stay finite at zero (the gradient of `sqrt` at 0 is infinite, DESIGN.md §3).

Written once in `keras.ops` for every Keras backend; derivatives (a convolution's adjoint, an activation's
derivative, reverse-mode Jacobian rows) come from `keras_wssi.backend.vjp`. Functions compute in the dtype of
their input: float64 on TensorFlow; on JAX float64 exists only with `jax_enable_x64`
(`keras_wssi.backend.supports_float64()`), otherwise float64 arrays are converted to float32 (JAX's default
32-bit mode), so results are float32-accurate there.
"""

import keras
import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi import validation

__all__ = [
    "NORMS",
    "conv2d_operator_norm",
    "dense_chain_jacobian",
    "entrywise_norm",
    "gram_from_jacobian",
    "jacobian_from_vjp",
    "jacobian_lanczos",
    "jacobian_power_iteration",
    "kernel_matrices",
    "l2_normalize",
    "matrix_norm",
    "per_example_jacobian",
    "power_iteration",
    "random_unit_rows",
    "safe_norm",
    "spectral_norm_squared",
    "top_eigenvector",
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
    x = ops.convert_to_tensor(x)
    return ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=keepdims) + ops.cast(epsilon * epsilon, x.dtype))


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """`x / ||x||` along `axis`, guarded at zero."""
    return x / safe_norm(x, axis=axis, keepdims=True, epsilon=epsilon)


def entrywise_norm(x, p, epsilon=1e-12):
    """`(Σ |x|^p)^(1/p)` for `p >= 1`, guarded at zero."""
    x = ops.convert_to_tensor(x)
    if p == 2.0:
        return safe_norm(x, epsilon=epsilon)
    if p == 1.0:
        return ops.sum(ops.abs(x))
    total = ops.sum(ops.power(ops.abs(x), p)) + ops.cast(epsilon**p, x.dtype)
    return ops.power(total, 1.0 / p)


def kernel_matrices(kernel, kind="dense"):
    """The kernel as a batch of matrices `(B, fan_in, fan_out)` whose largest spectral norm bounds the layer.

    Dense and convolution kernels give one matrix `(∏ kernel_size · C_in, C_out)` (the reshaping of
    Yoshida & Miyato 2017); a depthwise kernel `(k…, C_in, M)` gives one `(∏ k, M)` matrix per input
    channel, since channels do not mix.
    """
    kernel = ops.convert_to_tensor(kernel)
    if kind == "depthwise_conv":
        spatial = int(np.prod(kernel.shape[:-2]))
        channels, multiplier = kernel.shape[-2], kernel.shape[-1]
        matrices = ops.reshape(kernel, [spatial, channels, multiplier])
        return ops.transpose(matrices, [1, 0, 2])
    return ops.reshape(kernel, [1, -1, kernel.shape[-1]])


def random_unit_rows(shape, seed):
    """The one way keras_wssi makes power-iteration start vectors: Gaussian draws of `shape` (NumPy, float32),
    each row normalized (a row is `x[i]` flattened over all but the first axis).

    NumPy, so a penalty can create its state also inside the first traced step (subclassed models); `seed` is
    anything `numpy.random.default_rng` accepts (e.g. `[index, tag]`), so runs agree without a global seed.
    """
    draw = np.random.default_rng(seed).standard_normal(shape)
    norms = np.linalg.norm(draw.reshape(shape[0], -1), axis=-1).reshape((-1,) + (1,) * (len(shape) - 1))
    return (draw / np.maximum(norms, 1e-30)).astype(np.float32)


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
    iterations = validation.positive_int(iterations, "iterations")
    matrices = ops.convert_to_tensor(matrices)
    held = ops.stop_gradient(matrices)
    u = ops.stop_gradient(ops.cast(u, matrices.dtype))
    v = None
    for _ in range(iterations):
        v = l2_normalize(ops.einsum("bm,bmn->bn", u, held), epsilon=epsilon)
        u = l2_normalize(ops.einsum("bmn,bn->bm", held, v), epsilon=epsilon)
    u, v = ops.stop_gradient(u), ops.stop_gradient(v)
    sigma = ops.einsum("bm,bmn,bn->b", u, matrices, v)
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
        return ops.max(sigma), new_u
    return entrywise_norm(kernel, norm, epsilon=epsilon), None


# ---------------------------------------------------------------------------------------------------------------
# Input-Jacobian tools (DESIGN.md §1.2, §1.3). They take functions or products, never Keras models, and avoid the
# two formulations that do not compile under XLA here (forward-mode accumulators differentiated by an outer tape,
# and `tape.batch_jacobian`, DESIGN.md §3): full Jacobians are built from reverse-mode products only.


def _flat(x):
    """`(batch, …)` → `(batch, prod(…))`."""
    return ops.reshape(x, [ops.shape(x)[0], -1])


def per_example_jacobian(function, x, num_classes=None):
    """The full per-example Jacobian `∂function(x)_i/∂x_i`, vectorised into one forward and one backward pass.

    The batch is replicated once per output (`C · B` rows), and one backward pass with the cotangent `e_c` on
    replica `c` yields every row of every Jacobian at once. Only reverse-mode products are used, so this
    compiles under XLA (unlike TensorFlow's `tape.batch_jacobian`). The examples must not interact inside `function` (true in
    inference mode; BatchNorm in training mode, for instance, mixes them).

    Args:
        function: maps a batch `(B, …)` to outputs `(B, C)`.
        x: the batch, floating point.
        num_classes: `C`; read from one call of `function` when None.

    Returns:
        `(B, C, …)` float tensor: `result[i, c]` is `∇_x function(x)_{i,c}`.

    Example:

    ```python
    jacobian = keras_wssi.linalg.per_example_jacobian(lambda t: model(t, training=False), images)
    ```
    """
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise TypeError(f"x must be floating point to be differentiated, got dtype {dtype}.")
    if num_classes is None:
        num_classes = function(x).shape[-1]
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive integer (the number of outputs), got {num_classes!r}.")
    num_classes = int(num_classes)
    shape = ops.shape(x)
    batch, feature_shape = shape[0], list(shape[1:])
    replicated = ops.reshape(ops.repeat(ops.expand_dims(x, 0), num_classes, axis=0), [-1] + feature_shape)
    outputs, pullback = backend.vjp(function, replicated)
    if len(outputs.shape) != 2:
        raise ValueError(f"function must return (batch, C) outputs, got shape {tuple(outputs.shape)}.")
    # Replica c carries the cotangent e_c for every example of the batch.
    identity = ops.eye(num_classes, dtype=keras.backend.standardize_dtype(outputs.dtype))
    cotangent = ops.reshape(ops.broadcast_to(identity[:, None, :], [num_classes, batch, num_classes]), [-1, num_classes])
    (rows,) = pullback(cotangent)
    rows = ops.reshape(rows, [num_classes, batch] + feature_shape)
    permutation = [1, 0] + list(range(2, len(x.shape) + 1))
    return ops.transpose(rows, permutation)


def jacobian_from_vjp(vjp, batch_size, num_classes, stop_gradients=False):
    """The full per-example Jacobian from `C` vector-Jacobian products `e_cᵀ J` (an unrolled loop).

    This is how a training step gets the exact Jacobian from its own forward pass (no extra forward), e.g.
    through `PenaltyContext.vjp`.

    Args:
        vjp: maps cotangents `(B, C)` to `(B, …)` products `c_iᵀ J(x_i)`.
        batch_size: `B` (a scalar tensor is fine).
        num_classes: `C`, a Python int.
        stop_gradients: hold the result constant for differentiation (cheaper when only a direction is needed).

    Returns:
        `(B, C, …)`.
    """
    rows = []
    for c in range(int(num_classes)):
        basis_vector = ops.one_hot(ops.convert_to_tensor(c, "int32"), int(num_classes), dtype="float32")
        cotangent = ops.broadcast_to(basis_vector[None], [batch_size, int(num_classes)])
        row = vjp(cotangent)
        rows.append(ops.stop_gradient(row) if stop_gradients else row)
    return ops.stack(rows, axis=1)


def gram_from_jacobian(jacobian):
    """`J Jᵀ` per example, `(B, C, C)`, from a `(B, C, …)` Jacobian."""
    shape = ops.shape(jacobian)
    flat = ops.reshape(jacobian, [shape[0], shape[1], -1])
    return ops.einsum("bcd,bed->bce", flat, flat)


def top_eigenvector(gram, squarings=10, epsilon=1e-30):
    """Unit eigenvector of the largest eigenvalue of each positive semi-definite `(B, C, C)` matrix, and that
    eigenvalue (its Rayleigh quotient).

    By repeated squaring, `A ← A² / trace(A²)`: after `k` squarings the columns of `A` are `G^(2^k)` applied to
    the basis vectors, i.e. power iteration with `2^k` (1024 by default) steps for `k` tiny batched matmuls. The
    column of largest norm is taken (it cannot be orthogonal to the top eigenvector unless all are). This is
    exact to float precision unless the top two eigenvalues agree to ~1e-3 relative, in which case any vector of
    their span has a Rayleigh quotient that close to the top. An eigen-solver (`eigh`) gives the same result but was
    ~25× slower than a whole training step under XLA on CPU for a batch of 128 10×10 matrices.

    Args:
        gram: `(B, C, C)` symmetric positive semi-definite matrices (e.g. `J Jᵀ`).
        squarings: number of squarings `k`.

    Returns:
        `(vector (B, C), eigenvalue (B,))`.
    """
    gram = ops.convert_to_tensor(gram)
    power = gram / (_trace(gram)[:, None, None] + epsilon)
    for _ in range(int(squarings)):
        power = ops.matmul(power, power)
        power = power / (_trace(power)[:, None, None] + epsilon)
    column_norms = ops.sum(ops.square(power), axis=1)
    best = ops.argmax(column_norms, axis=-1)
    # Column `best` of each matrix (a one-hot selection: exact, and the same on every backend).
    vector = ops.einsum("bcj,bj->bc", power, ops.one_hot(best, power.shape[-1], dtype=power.dtype))
    vector = l2_normalize(vector, axis=-1)
    eigenvalue = ops.einsum("bc,bcd,bd->b", vector, gram, vector)
    return vector, eigenvalue


def _trace(matrices):
    """The trace of each matrix of a `(B, C, C)` batch (the sum of the diagonal, as `tf.linalg.trace`)."""
    return ops.sum(ops.diagonal(matrices, axis1=-2, axis2=-1), axis=-1)


def spectral_norm_squared(jacobian, squarings=10):
    """Per-example `σ_max(J)²` and the top left singular vector `v`, with the envelope-theorem gradient.

    The one implementation of the per-example spectral norm of a Jacobian in keras_wssi: the spectral-norm
    penalty (`method="exact"`), the slope penalty, `keras_wssi.analysis.slope` and the evaluation's Jacobian
    statistics all call it. `v` is the top eigenvector of the `C×C` Gram matrix `J Jᵀ` (`top_eigenvector`, held
    constant: no `eigh` in a training step, which was ~25× a whole step under XLA) and `σ² = ||vᵀ J||²` is
    differentiable in `J` (exact at the eigenvector, where `∂σ²/∂J = 2 v vᵀ J`).

    Args:
        jacobian: `(B, C, …)` per-example Jacobians; float64 gives float64 accuracy (analysis) on TensorFlow, and
            on JAX with `jax_enable_x64` (without it, JAX computes float64 input in float32); float32 the
            training step's.
        squarings: repeated squarings in `top_eigenvector` (`2^squarings` power steps).

    Returns:
        `(v (B, C), sigma_squared (B,))`.

    Example:

    ```python
    _, sigma_squared = keras_wssi.linalg.spectral_norm_squared(jacobian)   # jacobian: (B, C, d)
    ```
    """
    jacobian = ops.convert_to_tensor(jacobian)
    shape = ops.shape(jacobian)
    flat = ops.reshape(jacobian, [shape[0], shape[1], -1])
    vector, _ = top_eigenvector(ops.stop_gradient(ops.einsum("bcd,bed->bce", flat, flat)), squarings=squarings)
    vector = ops.stop_gradient(vector)
    return vector, ops.sum(ops.square(ops.einsum("bc,bcd->bd", vector, flat)), axis=-1)


def dense_chain_jacobian(kernels, biases, activations, x):
    """The per-example logit Jacobian `(B, C, d)` of a chain `Dense → activations → … → Dense`, by the chain rule
    `W_Lᵀ D_{L−1} … D_1 W_1ᵀ` with `D_l = diag σ'(pre-activation)` (for ReLU, the local affine map at `x`).

    Differentiable in the kernels (the masks `D_l` are held constant). One forward pass of the chain.

    Args:
        kernels: the `(n_{l−1}, n_l)` kernels, first to last.
        biases: the biases (None where a layer has none).
        activations: per hidden layer, the elementwise functions applied after it.
        x: inputs `(B, …)`, flattened to `(B, d)`.
    """
    x = ops.convert_to_tensor(x)
    h = ops.reshape(ops.cast(x, "float32"), [ops.shape(x)[0], -1])
    kernels = [ops.cast(k, "float32") for k in kernels]
    derivatives = []
    for index, (kernel, bias) in enumerate(zip(kernels, biases)):
        pre = ops.matmul(h, kernel)
        if bias is not None:
            pre = pre + ops.cast(bias, "float32")
        if index == len(kernels) - 1:
            break

        def activate(values, functions=tuple(activations[index])):
            for fn in functions:
                values = ops.cast(fn(values), "float32")
            return values

        h, pullback = backend.vjp(activate, pre)
        # Elementwise activations: the gradient of Σ σ(pre) is σ'(pre), the diagonal of D_l.
        (derivative,) = pullback(ops.ones_like(h))
        derivatives.append(ops.stop_gradient(derivative))
    jacobian = ops.transpose(kernels[-1])[None]  # (1, C, n_{L-1})
    for kernel, derivative in zip(reversed(kernels[:-1]), reversed(derivatives)):
        jacobian = ops.einsum("bcn,mn->bcm", jacobian * derivative[:, None, :], kernel)
    if len(kernels) == 1:
        jacobian = ops.broadcast_to(jacobian, [ops.shape(h)[0], *jacobian.shape[1:]])
    return jacobian


def jacobian_power_iteration(vjp, jvp, start, iterations=2, epsilon=1e-12):
    """Per-example power iteration on `J Jᵀ` (C×C) for `σ_max(J)²`, with the envelope-theorem gradient.

    Johansson et al., "Improved Spectral Norm Regularization for Neural Networks" (arXiv 2206.13581): each
    round is one vector-Jacobian product `u = Jᵀ v` and one Jacobian-vector product `J u`, with `v ← J u / ||J u||`.
    The rounds are held constant (`stop_gradient`); the returned `σ² = ||vᵀ J||²` comes from one more,
    differentiable VJP, so its gradient flows through `J` only — exact at the fixed point, where
    `∂σ²/∂J = 2 v vᵀ J`. Unrolled in Python: a few fixed rounds compile faster and run faster than a
    `while_loop` under XLA (DESIGN.md §3).

    Args:
        vjp: maps `(B, C)` cotangents to `(B, …)` products `vᵀ J`.
        jvp: maps `(B, …)` tangents to `(B, C)` products `J u`.
        start: `(B, C)` start vectors (need not be normalized; a zero row stays zero, guarded).
        iterations: number of `v → J Jᵀ v` rounds, `>= 1`.

    Returns:
        `(v, sigma_squared)`: the final unit vectors `(B, C)` (constant) and `||vᵀ J||²` per example `(B,)`.
    """
    iterations = validation.positive_int(iterations, "iterations")
    v = l2_normalize(ops.stop_gradient(ops.cast(start, "float32")), axis=-1, epsilon=epsilon)
    for _ in range(iterations):
        u = ops.stop_gradient(vjp(v))
        v = l2_normalize(ops.stop_gradient(jvp(u)), axis=-1, epsilon=epsilon)
    rows = vjp(v)
    return v, ops.sum(ops.square(_flat(rows)), axis=-1)


def jacobian_lanczos(vjp, jvp, start, iterations=2, epsilon=1e-12):
    """Per-example `σ_max(J)²` from the Krylov space of `J Jᵀ` (Lanczos with full reorthogonalization).

    The same products as `jacobian_power_iteration` with the same `iterations` (k rounds of `Jᵀ q`, `J u`) plus
    one more vector-Jacobian product, but the estimate is the largest Ritz value of the whole Krylov space
    `span{v, G v, …, G^k v}` (`G = J Jᵀ`) instead of the Rayleigh quotient of its last vector: it is never
    below power iteration's and converges much faster when the top singular values are close, which is the
    common case for trained classifiers (ours; the paper uses plain power iteration). The Gram matrix of the
    space comes free from the products, `T_ij = (Jᵀq_i)ᵀ(Jᵀq_j)`; the returned `||yᵀ J||²` at the Ritz vector
    `y` (held constant) is one more, differentiable VJP, so the gradient is the envelope-theorem one.

    Args:
        vjp: `(B, C)` → `(B, …)` products `qᵀ J`.
        jvp: `(B, …)` → `(B, C)` products `J u`.
        start: `(B, C)` start vectors.
        iterations: Krylov expansions `k >= 1` (the space has dimension `k + 1 <= C`).

    Returns:
        `(y, sigma_squared)`: unit Ritz vectors `(B, C)` (constant) and `||yᵀ J||²` `(B,)`.
    """
    iterations = validation.positive_int(iterations, "iterations")
    basis = [l2_normalize(ops.stop_gradient(ops.cast(start, "float32")), axis=-1, epsilon=epsilon)]
    products = []
    for step in range(iterations + 1):
        product = ops.stop_gradient(vjp(basis[step]))
        products.append(_flat(product))
        if step == iterations:
            break
        w = ops.stop_gradient(jvp(product))
        scale = safe_norm(w, axis=-1, keepdims=True, epsilon=epsilon)
        residual = w
        for _ in range(2):  # Classical Gram-Schmidt, twice ("twice is enough").
            for q in basis:
                residual = residual - ops.sum(q * residual, axis=-1, keepdims=True) * q
        norm = safe_norm(residual, axis=-1, keepdims=True, epsilon=epsilon)
        # An exhausted Krylov space (w already in the span) adds a zero vector, not amplified round-off.
        keep = ops.cast(norm > 1e-4 * scale, residual.dtype)
        basis.append(keep * residual / norm)
    stacked_basis = ops.stack(basis, axis=1)  # (B, k+1, C)
    stacked_products = ops.stack(products, axis=1)  # (B, k+1, d)
    ritz_matrix = ops.einsum("bid,bjd->bij", stacked_products, stacked_products)
    coefficients, _ = top_eigenvector(ritz_matrix)
    y = l2_normalize(ops.einsum("bi,bic->bc", coefficients, stacked_basis), axis=-1, epsilon=epsilon)
    y = ops.stop_gradient(y)
    rows = vjp(y)
    return y, ops.sum(ops.square(_flat(rows)), axis=-1)


def _conv_arguments(strides, padding, dilations):
    if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")
    return strides, padding.lower(), dilations


def _conv2d(inputs, kernel, strides, padding, dilations):
    return ops.conv(inputs, kernel, strides=strides, padding=padding, data_format="channels_last", dilation_rate=dilations)


def conv2d_operator_norm(kernel, u, strides=1, padding="same", dilations=1, iterations=1, epsilon=1e-12):
    """Spectral norm of the linear map `x ↦ conv2d(x, kernel)` on a fixed input shape, by power iteration.

    Yoshida & Miyato (2017) bound a convolution by the spectral norm of its reshaped kernel matrix, which can
    under- or over-estimate the operator norm of the convolution itself (up to a factor `sqrt(k_h k_w)`). This
    is the true operator norm: each round applies the convolution (`keras.ops.conv`) and its transpose (the
    convolution's pullback with respect to its input, the exact adjoint, including padding and strides: what
    `conv2d_transpose` computes).

    Args:
        kernel: `(k_h, k_w, C_in, C_out)`, channels-last (the Keras layout).
        u: `(1, H, W, C_in)` start vector in the input space, e.g. kept from the previous step (warm start).
        strides, padding, dilations: those of the layer (`padding` is `"same"` or `"valid"`).
        iterations: rounds, `>= 1`.

    Returns:
        `(u, sigma)`: the new input-space vector (constant, unit norm) and `σ = vᵀ conv(u)`, differentiable
        through the kernel only (envelope theorem).
    """
    iterations = validation.positive_int(iterations, "iterations")
    strides, padding, dilations = _conv_arguments(strides, padding, dilations)
    kernel = ops.convert_to_tensor(kernel)
    held = ops.stop_gradient(kernel)
    u = ops.stop_gradient(ops.cast(u, kernel.dtype))
    v = None
    for _ in range(iterations):
        v, adjoint = backend.vjp(lambda t: _conv2d(t, held, strides, padding, dilations), u)
        v = v / safe_norm(v, epsilon=epsilon)
        # The adjoint of the convolution (the transposed convolution, with the layer's padding and strides) is
        # the pullback of the convolution with respect to its input.
        (u,) = adjoint(v)
        u = u / safe_norm(u, epsilon=epsilon)
    u, v = ops.stop_gradient(u), ops.stop_gradient(v)
    sigma = ops.sum(v * _conv2d(u, kernel, strides, padding, dilations))
    return u, sigma
