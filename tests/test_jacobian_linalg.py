"""Jacobian tools of keras_wssi.linalg and the identities of keras_wssi.analysis.jacobian, against brute force."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from keras_wssi import backend
from keras_wssi import linalg
from keras_wssi.analysis import jacobian as analysis
from keras_wssi.penalties.base import PenaltyContext

from _testing import BACKEND

# The precision of the reference models: float64 on TensorFlow; JAX runs in 32-bit mode by default (x64 off), so
# the same models are float32 there and the float64 tolerances are relaxed to float32 ones (`tolerance`).
FLOAT = "float64" if BACKEND == "tensorflow" else "float32"


def tolerance(float64, float32):
    """The tolerance of an assertion on float64 models (TensorFlow) or their float32 stand-ins (JAX)."""
    return float64 if FLOAT == "float64" else float32


def relu_mlp(dtype=FLOAT, input_shape=(6,), hidden=(16, 16), classes=5):
    inputs = keras.Input(input_shape, dtype=dtype)
    x = keras.layers.Flatten(dtype=dtype)(inputs)
    for units in hidden:
        x = keras.layers.Dense(units, activation="relu", dtype=dtype)(x)
    return kw.Model(inputs, keras.layers.Dense(classes, dtype=dtype)(x))


def relu_cnn(dtype=FLOAT, classes=4):
    inputs = keras.Input((6, 6, 2), dtype=dtype)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", dtype=dtype)(inputs)
    x = keras.layers.MaxPooling2D(2, dtype=dtype)(x)
    x = keras.layers.Conv2D(4, 2, strides=1, padding="valid", activation="relu", dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    return kw.Model(inputs, keras.layers.Dense(classes, dtype=dtype)(x))


def brute_force_jacobian(model, x):
    """Row c of example i: the gradient of logit c of example i alone (one tape per output)."""
    if BACKEND == "jax":
        import jax

        rows = []
        for i in range(len(x)):
            xi = np.asarray(x[i : i + 1], model.inputs[0].dtype)
            rows.append(np.stack([
                np.asarray(jax.grad(lambda t, c=c: model(t, training=False)[0, c])(xi)[0])
                for c in range(model.output_shape[-1])
            ]))
        return np.stack(rows).astype(np.float64)
    import tensorflow as tf

    rows = []
    for i in range(len(x)):
        xi = tf.constant(x[i : i + 1])
        per_class = []
        for c in range(model.output_shape[-1]):
            with tf.GradientTape() as tape:
                tape.watch(xi)
                out = model(xi, training=False)[0, c]
            per_class.append(tape.gradient(out, xi)[0].numpy())
        rows.append(np.stack(per_class))
    return np.stack(rows)


@pytest.mark.parametrize("build", [relu_mlp, relu_cnn])
def test_per_example_jacobian_matches_per_output_gradients(build):
    model = build()
    shape = model.input_shape[1:]
    x = np.random.default_rng(0).normal(size=(3, *shape))
    expected = brute_force_jacobian(model, x)
    rtol, atol = tolerance(1e-10, 1e-5), tolerance(1e-12, 1e-6)
    x = x.astype(FLOAT)
    vectorised = ops.convert_to_numpy(linalg.per_example_jacobian(lambda t: model(t, training=False), x))
    np.testing.assert_allclose(vectorised, expected, rtol=rtol, atol=atol)
    np.testing.assert_allclose(analysis.input_jacobian(model, x, batch_size=2), expected, rtol=rtol, atol=atol)
    # The C-product form (what a training step uses) gives the same matrix.
    _, logits, jacobian = backend.forward_with_input_jacobian(model, ops.convert_to_tensor(x), False)
    if BACKEND == "tensorflow":  # In the model's float64 (`InputJacobian.vjp` returns float32).
        vjp = lambda c: jacobian.tape.gradient(logits, jacobian.x, output_gradients=ops.cast(c, logits.dtype))  # noqa: E731
    else:
        vjp = jacobian.vjp
    from_products = ops.convert_to_numpy(linalg.jacobian_from_vjp(vjp, 3, model.output_shape[-1]))
    np.testing.assert_allclose(from_products, expected, rtol=rtol, atol=atol)


def test_per_example_jacobian_compiles_under_xla():
    model = relu_cnn(dtype="float32")
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 2)).astype("float32")
    compiled = backend.function(
        lambda t: linalg.per_example_jacobian(lambda s: model(s, training=False), t), variables=model.variables
    )
    np.testing.assert_allclose(ops.convert_to_numpy(compiled(x)), brute_force_jacobian(model, x), rtol=1e-4, atol=1e-5)


def test_top_eigenvector_matches_eigh_including_near_degenerate():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 6, 40))
    gram = np.einsum("bcd,bed->bce", a, a)
    values, vectors = np.linalg.eigh(gram)
    values[:, -2] = 0.99 * values[:, -1]
    gram = np.einsum("bij,bj,bkj->bik", vectors, values, vectors)
    vector, eigenvalue = linalg.top_eigenvector(ops.convert_to_tensor(gram.astype(FLOAT)))
    np.testing.assert_allclose(ops.convert_to_numpy(eigenvalue), values[:, -1], rtol=tolerance(1e-10, 1e-5))
    np.testing.assert_allclose(
        np.abs(np.einsum("bc,bc->b", ops.convert_to_numpy(vector), vectors[:, :, -1])), 1.0, atol=1e-6
    )


def test_spectral_norm_squared_keeps_float64_where_the_backend_has_it():
    # Analysis passes float64 Jacobians: float64 results on TensorFlow; JAX (x64 off by default) computes them in
    # float32, documented in keras_wssi.linalg, float32-accurate.
    rng = np.random.default_rng(12)
    jacobian = rng.normal(size=(5, 4, 30))
    vector, sigma_squared = linalg.spectral_norm_squared(jacobian)
    expected = np.linalg.svd(jacobian, compute_uv=False)[:, 0] ** 2
    dtype = "float64" if backend.supports_float64() else "float32"
    assert keras.backend.standardize_dtype(sigma_squared.dtype) == dtype
    assert keras.backend.standardize_dtype(vector.dtype) == dtype
    np.testing.assert_allclose(ops.convert_to_numpy(sigma_squared), expected, rtol=1e-12 if dtype == "float64" else 1e-5)
    assert BACKEND != "tensorflow" or dtype == "float64"


def _products(model, x):
    xt, logits, jacobian = backend.forward_with_input_jacobian(model, ops.convert_to_tensor(x.astype(FLOAT)), False)
    return PenaltyContext(model, xt, None, None, logits, False, input_jacobian=jacobian)


@pytest.mark.parametrize("iterate", [linalg.jacobian_power_iteration, linalg.jacobian_lanczos])
def test_jacobian_iterations_converge_to_svd_and_error_decreases(iterate, capsys):
    model = relu_mlp(hidden=(32, 32), classes=6)
    x = np.random.default_rng(3).normal(size=(16, 6))
    exact = np.linalg.svd(brute_force_jacobian(model, x), compute_uv=False)[:, 0]
    context = _products(model, x)
    start = np.random.default_rng(4).normal(size=(16, 6))
    errors = []
    for iterations in (1, 2, 4, 8, 30):
        _, sigma_squared = iterate(context.vjp, context.jvp, start, iterations)
        errors.append(np.mean((exact - np.sqrt(ops.convert_to_numpy(sigma_squared))) / exact))
    with capsys.disabled():
        print(f"\n{iterate.__name__}: mean relative error vs SVD at 1/2/4/8/30 iterations: "
              + ", ".join(f"{e:.2e}" for e in errors))
    assert all(e >= -1e-5 for e in errors), "estimates from below"
    assert errors[-1] < 1e-3
    assert errors[2] <= errors[0] + 1e-6
    if iterate is linalg.jacobian_lanczos:
        assert errors[-2] < 1e-5  # Krylov space of dimension 6 = C: exact.


def test_lanczos_is_never_worse_than_power_iteration():
    model = relu_mlp(hidden=(32, 32), classes=8)
    x = np.random.default_rng(5).normal(size=(32, 6))
    context = _products(model, x)
    start = np.random.default_rng(6).normal(size=(32, 8))
    for iterations in (1, 2, 3):
        _, power = linalg.jacobian_power_iteration(context.vjp, context.jvp, start, iterations)
        _, lanczos = linalg.jacobian_lanczos(context.vjp, context.jvp, start, iterations)
        assert np.all(ops.convert_to_numpy(lanczos) >= ops.convert_to_numpy(power) * (1 - 1e-5))


def _numpy_conv2d(x, kernel, strides, padding):
    """A channels-last 2-D convolution in NumPy (float64), with TensorFlow's "SAME"/"VALID" padding."""
    (_, height, width, _), (k_h, k_w) = x.shape, kernel.shape[:2]
    if padding.upper() == "SAME":
        out_h, out_w = -(-height // strides), -(-width // strides)
        pad_h = max((out_h - 1) * strides + k_h - height, 0)
        pad_w = max((out_w - 1) * strides + k_w - width, 0)
        x = np.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)])
    else:
        out_h, out_w = (height - k_h) // strides + 1, (width - k_w) // strides + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for a in range(k_h):
        for b in range(k_w):
            patch = x[:, a : a + strides * (out_h - 1) + 1 : strides, b : b + strides * (out_w - 1) + 1 : strides]
            out += np.einsum("nijc,cd->nijd", patch, kernel[a, b])
    return out


def _conv_matrix(kernel, input_shape, strides, padding):
    size = int(np.prod(input_shape))
    basis = np.eye(size).reshape(size, *input_shape)
    out = _numpy_conv2d(basis, np.asarray(kernel, np.float64), strides, padding)
    return out.reshape(size, -1)


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID"), (2, "VALID")])
def test_conv2d_operator_norm_matches_svd_of_the_convolution_matrix(strides, padding):
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(3, 3, 2, 3))
    input_shape = (7, 7, 2)
    expected = np.linalg.norm(_conv_matrix(kernel, input_shape, strides, padding), ord=2)
    u = rng.normal(size=(1, *input_shape))
    _, sigma = linalg.conv2d_operator_norm(
        kernel.astype(FLOAT), u.astype(FLOAT), strides=strides, padding=padding.lower(), iterations=300
    )
    np.testing.assert_allclose(ops.convert_to_numpy(sigma), expected, rtol=1e-3)
    # The reshaped-matrix norm of the paper is a different number; the operator norm is at most sqrt(9) times it.
    reshaped = np.linalg.norm(kernel.reshape(-1, 3), ord=2)
    assert expected <= 3.0 * reshaped + 1e-9


def test_conv2d_operator_norm_gradient_is_envelope_gradient():
    rng = np.random.default_rng(8)
    kernel = rng.normal(size=(3, 3, 1, 2))
    u = rng.normal(size=(1, 5, 5, 1)).astype(FLOAT)
    (gradient,) = backend.grad(lambda k: linalg.conv2d_operator_norm(k, u, iterations=500)[1], kernel.astype(FLOAT))
    gradient = ops.convert_to_numpy(gradient)
    direction = rng.normal(size=kernel.shape)
    step = 1e-6

    def norm_at(k):
        return np.linalg.norm(_conv_matrix(k, (5, 5, 1), 1, "SAME"), ord=2)

    numeric = (norm_at(kernel + step * direction) - norm_at(kernel - step * direction)) / (2 * step)
    np.testing.assert_allclose(np.sum(gradient * direction), numeric, rtol=1e-4)


@pytest.mark.parametrize("build", [relu_mlp, relu_cnn])
def test_identities_of_section_1_3(build):
    model = build()
    classes = model.output_shape[-1]
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, *model.input_shape[1:]))
    y = rng.integers(0, classes, size=6)
    identities = analysis.jacobian_identities(model, x, y)
    for name in ("loss_gradient", "input_gradient_penalty", "cross_lipschitz", "hessian_vector"):
        left, right = identities[name]
        scale = max(np.max(np.abs(left)), 1e-12)
        close = tolerance(1e-6, 1e-4)
        np.testing.assert_allclose(left, right, atol=close * scale, rtol=close, err_msg=name)
    value, bound = identities["gradient_bound"]
    assert np.all(value <= bound * (1 + tolerance(1e-9, 1e-5)))
    spectral, frobenius, scaled = identities["norm_chain"]
    slack = tolerance(1e-12, 1e-6)
    assert np.all(spectral <= frobenius * (1 + slack)) and np.all(frobenius <= scaled * (1 + slack))
    # And against brute force, directly: the pairwise cross-Lipschitz sum from per-output gradients.
    brute = brute_force_jacobian(model, x).reshape(6, classes, -1)
    pairwise = sum(np.sum((brute[:, l] - brute[:, m]) ** 2, axis=-1) for l in range(classes) for m in range(classes))
    np.testing.assert_allclose(identities["cross_lipschitz"][1], pairwise, rtol=tolerance(1e-9, 1e-5))


def test_cure_difference_is_h_times_hessian_vector_inside_a_linear_region():
    model = relu_mlp(hidden=(12,), classes=3)
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 6))
    y = rng.integers(0, 3, size=4)
    identities = analysis.jacobian_identities(model, x, y)
    _, hessian_z = identities["hessian_vector"]
    gradient = identities["loss_gradient"][0]
    z = np.sign(gradient) / np.linalg.norm(np.sign(gradient), axis=-1, keepdims=True)
    # Small enough that no ReLU changes sign between x and x + h z (in float32, large enough to beat round-off).
    h = tolerance(1e-5, 1e-3)
    _, probe_gradient, _ = analysis._autodiff_loss_gradient_and_hvp(model, x + h * z, y, np.zeros_like(x))
    np.testing.assert_allclose(
        (probe_gradient - gradient) / h, hessian_z, rtol=tolerance(1e-4, 1e-2), atol=tolerance(1e-8, 1e-5)
    )


def test_penalty_report_lists_every_penalty_consistently():
    model = relu_mlp(hidden=(16,), classes=4)
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(10, 6)), rng.integers(0, 4, size=10)
    report = analysis.jacobian_penalty_report(model, x, y, cure_h=0.1)
    expected = {"input_gradient", "jacobian_frobenius", "jacobian_frobenius_norm", "jacobian_spectral_norm",
                "jacobian_spectral_norm_squared", "centered_spectral_norm", "cross_lipschitz", "cure",
                "layerwise_spectral_norm", "layerwise_spectral_product"}
    assert expected <= set(report)
    assert all(np.isfinite(v) for v in report.values())
    # σ_max(J) <= ∏ σ(W_l) for a ReLU MLP; ||P J||_2 <= ||J||_2.
    slack = tolerance(1e-9, 1e-5) * max(report["jacobian_spectral_norm"], 1.0)
    assert report["jacobian_spectral_norm"] <= report["layerwise_spectral_product"] + slack
    assert report["centered_spectral_norm"] <= report["jacobian_spectral_norm"] + slack
