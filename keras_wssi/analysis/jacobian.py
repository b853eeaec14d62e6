"""The input Jacobian of a classifier, and how the Jacobian, curvature and cross-Lipschitz penalties connect.

Guo, Chen, Chen & Zhang, "On Connections between Regularizations for Improving DNN Robustness"
(arXiv 2007.02209), DESIGN.md §1.3. With logits `z = f(x) ∈ R^C`, `J = ∂z/∂x`, `p = softmax(z)`,
`ℓ = CE(z, y)` and the centering `P = I − 11ᵀ/C`, for ReLU networks:

- `∇_x ℓ = Jᵀ (p − e_y)`, so the input-gradient penalty is `(p − e_y)ᵀ J Jᵀ (p − e_y)`;
- `Σ_{l,m} ||∇z_l − ∇z_m||² = 2C ||P J||_F²`: cross-Lipschitz is the Jacobian penalty of the centered logits;
- `||∇_x ℓ||² ≤ ||p − e_y||² ||P J||_2²`;
- inside one linear region `∇²_x ℓ = Jᵀ (diag p − p pᵀ) J`, so CURE's difference is `h Jᵀ(diag p − p pᵀ) J z`.

All four are weighted norms of `P J`. The functions here compute each side numerically (float64 NumPy from the
model's Jacobian), and `jacobian_penalty_report` puts every penalty of the family side by side on one batch.
The Jacobian and the loss gradients come from the active Keras backend in the model's dtype (on JAX, float64
models and inputs need `jax_enable_x64`; without it they compute in float32); everything after is NumPy float64.
"""

import keras
import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi import labels as labels_module
from keras_wssi import linalg
from keras_wssi import structure
from keras_wssi import validation
from keras_wssi.analysis._compute import compiled
from keras_wssi.analysis._compute import unique_variables
from keras_wssi.context import PenaltyContext

__all__ = [
    "centered_jacobian",
    "input_jacobian",
    "jacobian_identities",
    "jacobian_penalty_report",
    "jacobian_spectral_norm_estimates",
    "layerwise_spectral_norms",
]


def input_jacobian(model, x, batch_size=128, training=False):
    """Per-example input Jacobian of the logits, `(N, C, *input_shape)`, as a float64 NumPy array.

    Vectorised (`keras_wssi.linalg.per_example_jacobian`: one forward and one backward pass over the batch
    replicated C times) and computed in batches of `batch_size` examples.

    Args:
        model: a classifier returning logits `(batch, C)`.
        x: inputs, floating point.
        batch_size: examples per pass.
        training: the mode of the forward pass (False: inference, which keeps examples independent).

    Example:

    ```python
    jacobian = keras_wssi.analysis.input_jacobian(model, x_test[:100])   # (100, 10, 28, 28, 1)
    ```
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be floating point to be differentiated, got dtype {x.dtype}.")
    batch_size = validation.positive_int(batch_size, "batch_size")

    def jacobian_of(batch):
        return linalg.per_example_jacobian(lambda t: model(t, training=training), batch)

    jacobian_of = compiled(jacobian_of, model.variables)
    parts = [
        ops.convert_to_numpy(jacobian_of(ops.convert_to_tensor(x[i : i + batch_size])))
        for i in range(0, len(x), batch_size)
    ]
    result = np.concatenate(parts, axis=0).astype(np.float64)
    if result.ndim < 3:
        raise ValueError(f"The model must return logits (batch, C); the Jacobian has shape {result.shape}.")
    return result


def centered_jacobian(jacobian):
    """`P J` per example: each output row minus the mean row (the Jacobian of the centered logits)."""
    jacobian = np.asarray(jacobian, dtype=np.float64)
    return jacobian - jacobian.mean(axis=1, keepdims=True)


def _flat(jacobian):
    return jacobian.reshape(jacobian.shape[0], jacobian.shape[1], -1)


def _softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _autodiff_loss_gradient_and_hvp(model, x, labels, directions):
    """`∇_x ℓ` and `∇²_x ℓ · d` by plain autodiff of the per-example cross-entropy (the brute-force side)."""
    x = ops.convert_to_tensor(x)
    directions = ops.convert_to_tensor(directions, dtype=keras.backend.standardize_dtype(x.dtype))
    labels = ops.convert_to_tensor(labels, "int32")

    def loss(t):
        logits = model(t, training=False)
        return ops.sum(ops.sparse_categorical_crossentropy(labels, logits, from_logits=True))

    def loss_gradient(t):
        (gradient,) = backend.grad(loss, t)
        return gradient

    # Double backprop: the pullback of ∇_x ℓ along `directions` is ∇²_x ℓ · d (the Hessian is symmetric).
    gradient, pullback = backend.vjp(loss_gradient, x)
    (hessian_vector,) = pullback(directions)
    logits = model(x, training=False)

    def numpy64(t):
        return np.asarray(ops.convert_to_numpy(t)).astype(np.float64)

    return numpy64(logits), numpy64(gradient), numpy64(hessian_vector)


def jacobian_identities(model, x, y, directions=None):
    """Both sides of each identity of DESIGN.md §1.3, per example, on one batch.

    Left sides are computed by brute force (autodiff of the loss, all `C²` pairwise differences); right sides
    from the full Jacobian through the identities. For a ReLU network each pair agrees to round-off, and the
    inequality holds.

    Args:
        model: a classifier returning logits.
        x: a batch of inputs (use a float64 model and batch for checks to ~1e-12).
        y: integer labels (or one-hot).
        directions: for the Hessian identity, one direction per example shaped like `x`; default: CURE's
            `sign(∇_x ℓ)/||sign(∇_x ℓ)||`.

    Returns:
        A dict of name → `(left, right)` arrays: `"loss_gradient"` (`∇_x ℓ` vs `Jᵀ(p − e_y)`),
        `"input_gradient_penalty"` (`||∇_x ℓ||²` vs `(p − e_y)ᵀ J Jᵀ (p − e_y)`), `"cross_lipschitz"`
        (`Σ_{l,m} ||∇z_l − ∇z_m||²` vs `2C ||P J||_F²`), `"gradient_bound"` (`||∇_x ℓ||²` and its upper bound
        `||p − e_y||² ||P J||_2²`), `"hessian_vector"` (`∇²_x ℓ d` vs `Jᵀ (diag p − p pᵀ) J d`), and
        `"norm_chain"` (`(||J||_2, ||J||_F, sqrt(C) ||J||_2)`, nondecreasing).
    """
    x = np.asarray(x)
    jacobian = input_jacobian(model, x, batch_size=len(x))
    num_classes = jacobian.shape[1]
    labels = labels_module.class_indices(y, num_classes, "y")
    flat = _flat(jacobian)
    if directions is None:
        _, gradient, _ = _autodiff_loss_gradient_and_hvp(model, x, labels, np.zeros_like(x))
        signs = np.sign(gradient).reshape(len(x), -1)
        norms = np.linalg.norm(signs, axis=-1, keepdims=True)
        directions = (signs / np.where(norms > 0, norms, 1.0)).reshape(x.shape)
    logits, gradient, hessian_vector = _autodiff_loss_gradient_and_hvp(model, x, labels, np.asarray(directions))
    p = _softmax(logits)
    residual = p - np.eye(num_classes)[labels]
    gradient_flat = gradient.reshape(len(x), -1)
    through_jacobian = np.einsum("bc,bcd->bd", residual, flat)
    centered = _flat(centered_jacobian(jacobian))
    pairwise = ((flat[:, :, None, :] - flat[:, None, :, :]) ** 2).sum(axis=(1, 2, 3))
    centered_spectral = np.linalg.norm(centered, ord=2, axis=(1, 2))
    covariance = np.einsum("bc,cd->bcd", p, np.eye(num_classes)) - np.einsum("bc,bd->bcd", p, p)
    d = np.asarray(directions, dtype=np.float64).reshape(len(x), -1)
    hessian_via_jacobian = np.einsum("bcd,bce,be->bd", flat, np.einsum("bcf,bfe->bce", covariance, flat), d)
    spectral = np.linalg.norm(flat, ord=2, axis=(1, 2))
    frobenius = np.linalg.norm(flat, axis=(1, 2))
    return {
        "loss_gradient": (gradient_flat, through_jacobian),
        "input_gradient_penalty": ((gradient_flat**2).sum(-1), np.einsum("bd,bd->b", through_jacobian, through_jacobian)),
        "cross_lipschitz": (pairwise, 2.0 * num_classes * (centered**2).sum(axis=(1, 2))),
        "gradient_bound": ((gradient_flat**2).sum(-1), (residual**2).sum(-1) * centered_spectral**2),
        "hessian_vector": (hessian_vector.reshape(len(x), -1), hessian_via_jacobian),
        "norm_chain": (spectral, frobenius, np.sqrt(num_classes) * spectral),
    }


def layerwise_spectral_norms(model, iterations=50):
    """`σ(W_l)` of every kernel's reshaped matrix (Yoshida & Miyato), by SVD, as `{layer name: σ}`."""
    del iterations  # Exact SVD; kept for a stable signature with the power-iteration penalty.
    result = {}
    for weight_layer in structure.weight_layers(model):
        for index, kernel in enumerate(weight_layer.kernels):
            kind = weight_layer.kind
            if kind == "separable_conv":
                kind = "depthwise_conv" if index == 0 else "dense"
            # Reshaping is exact in any dtype; the SVD runs in float64 NumPy.
            matrices = np.asarray(ops.convert_to_numpy(linalg.kernel_matrices(kernel, kind)), np.float64)
            key = weight_layer.name if len(weight_layer.kernels) == 1 else f"{weight_layer.name}/{index}"
            result[key] = float(max(np.linalg.norm(m, ord=2) for m in matrices))
    return result


def jacobian_penalty_report(model, x, y, cure_h=0.5, batch_size=128):
    """Every penalty of the Jacobian family on one batch, side by side, computed exactly (float64 NumPy).

    Args:
        model: a classifier returning logits.
        x: inputs (N examples); y: integer (or one-hot) labels.
        cure_h: the CURE finite-difference step.
        batch_size: examples per Jacobian pass.

    Returns:
        A dict of batch means: `input_gradient` (`||∇_x ℓ||²`), `jacobian_frobenius` (`½ ||J||_F²`, the Hoffman
        et al. value), `jacobian_frobenius_norm` (`||J||_F`), `jacobian_spectral_norm` (`σ_max(J)`),
        `jacobian_spectral_norm_squared`, `centered_spectral_norm` (`||P J||_2`), `cross_lipschitz`
        (`(2/C) ||P J||_F²`), `cure` (`||∇ℓ(x + h z) − ∇ℓ(x)||`), `layerwise_spectral_norm`
        (`½ Σ_l σ(W_l)²`) and `layerwise_spectral_product` (`∏_l σ(W_l)`, the upper bound of `σ_max(J)` for
        ReLU networks with reshaped-kernel convolutions counted as the paper does).

    Example:

    ```python
    report = keras_wssi.analysis.jacobian_penalty_report(model, x_test[:256], y_test[:256])
    ```
    """
    x = np.asarray(x)
    jacobian = input_jacobian(model, x, batch_size=batch_size)
    num_classes = jacobian.shape[1]
    labels = labels_module.class_indices(y, num_classes, "y")
    flat = _flat(jacobian)
    logits = np.concatenate([np.asarray(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)])
    residual = _softmax(logits.astype(np.float64)) - np.eye(num_classes)[labels]
    loss_gradient = np.einsum("bc,bcd->bd", residual, flat)
    singular = np.linalg.svd(flat, compute_uv=False)
    centered = _flat(centered_jacobian(jacobian))
    centered_spectral = np.linalg.svd(centered, compute_uv=False)[:, 0]
    # CURE by autodiff at x and at the probe point.
    cure_values = []
    for i in range(0, len(x), batch_size):
        batch, batch_labels = x[i : i + batch_size], labels[i : i + batch_size]
        _, gradient, _ = _autodiff_loss_gradient_and_hvp(model, batch, batch_labels, np.zeros_like(batch))
        signs = np.sign(gradient).reshape(len(batch), -1)
        norms = np.linalg.norm(signs, axis=-1, keepdims=True)
        direction = (signs / np.where(norms > 0, norms, 1.0)).reshape(batch.shape)
        probe = (batch + cure_h * direction).astype(batch.dtype)
        _, probe_gradient, _ = _autodiff_loss_gradient_and_hvp(model, probe, batch_labels, np.zeros_like(batch))
        cure_values.append(np.linalg.norm((probe_gradient - gradient).reshape(len(batch), -1), axis=-1))
    layer_norms = np.array(list(layerwise_spectral_norms(model).values()))
    return {
        "input_gradient": float((loss_gradient**2).sum(-1).mean()),
        "jacobian_frobenius": float(0.5 * (flat**2).sum(axis=(1, 2)).mean()),
        "jacobian_frobenius_norm": float(np.sqrt((flat**2).sum(axis=(1, 2))).mean()),
        "jacobian_spectral_norm": float(singular[:, 0].mean()),
        "jacobian_spectral_norm_squared": float((singular[:, 0] ** 2).mean()),
        "centered_spectral_norm": float(centered_spectral.mean()),
        "cross_lipschitz": float((2.0 / num_classes) * (centered**2).sum(axis=(1, 2)).mean()),
        "cure": float(np.concatenate(cure_values).mean()),
        "layerwise_spectral_norm": float(0.5 * (layer_norms**2).sum()),
        "layerwise_spectral_product": float(np.prod(layer_norms)),
    }


def jacobian_spectral_norm_estimates(model, x, y, penalty, batch_size=128, warm_up=True):
    """`(estimate, exact)` per-example `σ_max(J)`: what `penalty` (a `JacobianSpectralNorm`) computes in a step
    on this data, and the SVD of the full Jacobian (float64). Used to report the estimate's error.

    The penalty is replayed through the same `PenaltyContext` the training step builds (analysis reads the
    penalty it is given; it does not import the penalties).

    With `start="warm"` the batches are processed as in training, each one's estimate starting from the state
    the earlier batches left (and updating it); `warm_up=True` first runs one pass over the data so that the
    first batches do not start cold, as after the first training steps."""
    x = np.asarray(x)
    if not penalty.built:
        penalty.build(model)
    warm = getattr(penalty, "start", None) == "warm"

    state = list(penalty.variables)

    def estimate(batch, labels):
        batch, logits, input_jacobian = backend.forward_with_input_jacobian(model, batch, training=False)
        # `training` of the context only decides whether a warm start's state is updated.
        context = PenaltyContext(model, batch, labels, None, logits, warm, input_jacobian=input_jacobian)
        # The penalty's state after the batch is returned and assigned below: a compiled JAX function's variable
        # updates are discarded (on TensorFlow the assignment repeats the one made inside).
        return penalty.sigma_squared(context), [v.value for v in state]

    estimate = compiled(estimate, unique_variables(model.variables, state))
    y = np.asarray(y)

    def one_batch(i):
        sigma_squared, values = estimate(ops.convert_to_tensor(x[i : i + batch_size]), ops.convert_to_tensor(y[i : i + batch_size]))
        for variable, value in zip(state, values):
            variable.assign(value)
        return ops.convert_to_numpy(sigma_squared)

    def one_pass():
        return np.concatenate([one_batch(i) for i in range(0, len(x), batch_size)])

    if warm and warm_up:
        one_pass()
    estimates = one_pass()
    exact = np.linalg.svd(_flat(input_jacobian(model, x, batch_size=batch_size)), compute_uv=False)[:, 0]
    return np.sqrt(np.maximum(estimates.astype(np.float64), 0.0)), exact
