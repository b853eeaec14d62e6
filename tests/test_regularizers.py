"""Per-layer keras.Regularizers: NumPy formulas, agreement with the model-level penalties, serialization."""

import os

import keras
import numpy as np
import pytest

import keras_wssi as kw
from keras_wssi import regularizers as R


@pytest.mark.parametrize(
    "regularizer, formula",
    [
        (R.LpDecay(0.3, p=2), lambda w: 0.3 * np.sum(w**2)),
        (R.LpDecay(0.3, p=1), lambda w: 0.3 * np.sum(np.abs(w))),
        (R.LpDecay(0.3, p=2.5), lambda w: 0.3 * np.sum(np.abs(w) ** 2.5)),
        (R.LogNorm(0.2), lambda w: 0.2 * np.log(np.linalg.norm(w))),
        (R.LogNorm(0.2, norm=1.0), lambda w: 0.2 * np.log(np.abs(w).sum())),
        (R.DirectionL1(0.1), lambda w: 0.1 * np.abs(w).sum() / np.linalg.norm(w)),
    ],
)
def test_values_match_numpy_and_config_round_trips(regularizer, formula):
    w = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)
    np.testing.assert_allclose(float(regularizer(w)), formula(w.astype(np.float64)), rtol=1e-5)
    clone = type(regularizer).from_config(regularizer.get_config())
    assert clone.get_config() == regularizer.get_config()
    revived = keras.regularizers.deserialize(keras.regularizers.serialize(regularizer))
    np.testing.assert_allclose(float(revived(w)), float(regularizer(w)), rtol=1e-7)


def test_sum_of_layer_log_norms_equals_the_weissi_penalty():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="relu", kernel_regularizer=R.LogNorm(1.0))(inputs)
    outputs = keras.layers.Dense(3, kernel_regularizer=R.LogNorm(1.0))(x)
    model = kw.Model(inputs, outputs)
    layer_total = float(sum(model.losses))
    weissi = kw.penalties.WEISSI(1.0)
    weissi.build(model)
    np.testing.assert_allclose(layer_total, float(weissi(kw.penalties.PenaltyContext(model, None, None, None, None, True))), rtol=1e-5)


def test_layer_regularizers_survive_save_and_load(tmp_path):
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, kernel_regularizer=R.LogNorm(0.5, norm=3.0))(inputs)
    model = kw.Model(inputs, outputs)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[-1].kernel_regularizer, R.LogNorm)
    np.testing.assert_allclose(float(sum(loaded.losses)), float(sum(model.losses)), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="strength"):
        R.LpDecay(-1.0)
    with pytest.raises(ValueError, match="p must be"):
        R.LpDecay(1.0, p=0.5)
    with pytest.raises(ValueError, match="spectral"):
        R.LogNorm(1.0, norm="spectral")
    with pytest.raises(ValueError, match="epsilon"):
        R.LogNorm(1.0, epsilon=0)


def _conv_same_matrix(kernel, height, width):
    """The matrix of `x ↦ conv2d(x, kernel)` (stride 1, "same" padding) on `(height, width, C_in)` inputs (NumPy)."""
    kh, kw_, channels, _ = kernel.shape
    top, left = (kh - 1) // 2, (kw_ - 1) // 2
    columns = []
    for index in range(height * width * channels):
        x = np.zeros(height * width * channels)
        x[index] = 1.0
        padded = np.pad(x.reshape(height, width, channels), [(top, kh - 1 - top), (left, kw_ - 1 - left), (0, 0)])
        out = np.stack(
            [np.einsum("abc,abco->o", padded[i : i + kh, j : j + kw_], kernel) for i in range(height) for j in range(width)]
        )
        columns.append(out.reshape(-1))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("convolution", [False, True])
def test_spectral_norm_regularizer_reaches_the_exact_norm_in_compiled_steps(convolution):
    """Inside the compiled step (Keras's jitted, stateless step on JAX; a tf.function with the warm-started vector on
    TensorFlow) the value reaches `λ/2 σ²` with the exact σ: at once on JAX (exact σ every step, no state update to
    lose), after a few warm-started steps on TensorFlow."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 5, 2))
    if convolution:
        regularizer = R.SpectralNormRegularizer(0.1, iterations=10, conv_input_shape=(5, 5, 2))
        hidden = keras.layers.Conv2D(3, 3, padding="same", kernel_regularizer=regularizer, name="regularized")(inputs)
    else:
        regularizer = R.SpectralNormRegularizer(0.1, iterations=10)
        hidden = keras.layers.Dense(3, kernel_regularizer=regularizer, name="regularized")(keras.layers.Flatten()(inputs))
    model = kw.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(hidden)))
    kernel = model.get_layer("regularized").kernel.numpy().astype(np.float64)
    matrix = _conv_same_matrix(kernel, 5, 5) if convolution else kernel
    expected = 0.05 * np.linalg.norm(matrix, 2) ** 2
    # Zero inputs and zero biases: the outputs are 0, so the loss is exactly the regularization term.
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=True)
    x, y = np.zeros((4, 5, 5, 2), np.float32), np.zeros((4, 2), np.float32)
    values = [float(model.test_on_batch(x, y)) for _ in range(60)]
    if kw.backend.BACKEND == "jax":
        np.testing.assert_allclose(values[0], expected, rtol=1e-5)
    np.testing.assert_allclose(values[-1], expected, rtol=2e-4)
    assert all(value <= expected * (1 + 1e-5) for value in values)
