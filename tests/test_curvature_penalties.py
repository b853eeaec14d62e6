"""CURE against brute force (autodiff at x and at the probe point), finite differences, training, serialization."""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from keras_wssi import penalties as P
from keras_wssi.analysis import jacobian as analysis

from test_jacobian_linalg import relu_cnn
from test_jacobian_linalg import relu_mlp
from test_jacobian_penalties import _directional_derivative_check
from test_jacobian_penalties import evaluate


def brute_force_cure(model, x, y, h, power):
    _, gradient, _ = analysis._autodiff_loss_gradient_and_hvp(model, x, y, np.zeros_like(x))
    signs = np.sign(gradient).reshape(len(x), -1)
    z = (signs / np.linalg.norm(signs, axis=-1, keepdims=True)).reshape(x.shape)
    _, probe, _ = analysis._autodiff_loss_gradient_and_hvp(model, x + h * z, y, np.zeros_like(x))
    return np.mean(np.linalg.norm((probe - gradient).reshape(len(x), -1), axis=-1) ** power)


@pytest.mark.parametrize("build", [relu_mlp, relu_cnn])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_value_matches_brute_force(build, power):
    model = build()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, *model.input_shape[1:]))
    y = rng.integers(0, model.output_shape[-1], size=5)
    for inference_probes in (False, True):
        penalty = P.CURE(h=0.3, power=power, inference_probes=inference_probes)
        np.testing.assert_allclose(evaluate(model, penalty, x, y), brute_force_cure(model, x, y, 0.3, power), rtol=1e-4)


def test_small_h_difference_is_h_times_hessian_along_z():
    model = relu_mlp(hidden=(12,), classes=3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 6)), rng.integers(0, 3, size=4)
    identities = analysis.jacobian_identities(model, x, y)
    _, hessian_z = identities["hessian_vector"]
    expected = np.mean(np.sum((1e-3 * hessian_z) ** 2, axis=-1))
    np.testing.assert_allclose(evaluate(model, P.CURE(h=1e-3, power=2.0), x, y), expected, rtol=1e-3)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_gradient_matches_finite_differences(power):
    model = relu_mlp(hidden=(10, 10), classes=4)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 6)), rng.integers(0, 4, size=5)
    # float64 models on TensorFlow; on JAX (float32) a larger step keeps rounding out of the central difference.
    step = 1e-5 if kw.backend.supports_float64() else 1e-4
    _directional_derivative_check(model, P.CURE(h=0.2, power=power), x, y, step=step)


def test_zero_gradient_gives_finite_value_and_gradient():
    inputs = keras.Input((4,), dtype="float64")
    model = kw.Model(inputs, keras.layers.Dense(3, kernel_initializer="zeros", dtype="float64")(inputs))
    value, gradients = evaluate(model, P.CURE(h=0.5), np.ones((2, 4)), np.array([0, 1]), with_gradient=True)
    assert np.isfinite(value) and all(g is None or np.all(np.isfinite(np.asarray(g))) for g in gradients)


def bn_dropout_model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5)(x)
    return kw.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_trains_under_xla_and_inference_probes_leave_batchnorm_statistics_alone(jit_compile):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    moving_means = {}
    for inference_probes in (True, False):
        keras.utils.set_random_seed(0)
        model = bn_dropout_model()
        model.compile(
            keras.optimizers.SGD(0.0),  # No weight change: only BatchNorm's moving statistics can move.
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            regularizers=[P.CURE(1.0, h=0.5, inference_probes=inference_probes)],
            jit_compile=jit_compile,
        )
        history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        assert np.isfinite(history.history["cure"][0])
        moving_means[inference_probes] = model.layers[2].moving_mean.numpy()
    # Probing in training mode also feeds the probe batch to BatchNorm's moving statistics.
    assert not np.allclose(moving_means[True], moving_means[False])


def test_config_round_trip_and_save_load(tmp_path):
    penalty = P.CURE(2.0, h=0.25, power=2.0, loss="compiled", inference_probes=True, name="curvature")
    config = penalty.get_config()
    assert P.CURE(**config).get_config() == config
    model = relu_mlp(dtype="float32", classes=3)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=[penalty])
    model.fit(np.zeros((4, 6), "float32"), np.zeros(4, "int64"), verbose=0)
    path = os.path.join(tmp_path, "cure.keras")
    model.save(path)
    assert keras.models.load_model(path).penalties[0].get_config() == config


def test_bad_input_gets_clear_errors():
    for h in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="h must"):
            P.CURE(h=h)
    with pytest.raises(ValueError, match="power"):
        P.CURE(power=0.0)
    with pytest.raises(TypeError, match="inference_probes"):
        P.CURE(inference_probes="yes")
    inputs = keras.Input((4,), dtype="int32")
    model = kw.Model(inputs, keras.layers.Dense(3)(keras.layers.Lambda(lambda t: ops.cast(t, "float32"))(inputs)))
    with pytest.raises(TypeError, match="floating point"):
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=[P.CURE()])
        model.fit(np.zeros((4, 4), "int32"), np.zeros(4, "int64"), verbose=0)
