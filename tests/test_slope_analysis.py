"""slope(model, x) (Johansson et al. 2021): equals the SVD of the brute-force Jacobian, is a function property."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from keras_wssi import backend
from keras_wssi.analysis import scale_shift
from keras_wssi.analysis import slope
from keras_wssi.analysis import slope_distribution


def _brute_force_slope(model, x):
    """σ_max of the Jacobian built row by row (one backend VJP `e_cᵀ J` per class), one example at a time, via
    NumPy's SVD (float64); eager, on the active backend."""
    values = []
    for example in x:
        logits, pullback = backend.vjp(lambda t: model(t, training=False), ops.convert_to_tensor(example[None]))
        classes = logits.shape[-1]
        rows = [pullback(ops.convert_to_tensor(np.eye(classes, dtype=np.float32)[c][None]))[0] for c in range(classes)]
        jacobian = np.stack([np.asarray(ops.convert_to_numpy(r)).reshape(-1) for r in rows]).astype(np.float64)
        values.append(np.linalg.svd(jacobian, compute_uv=False)[0])
    return np.array(values)


def _mlp(activation="relu", hidden=(12, 9), seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(inputs)
    for units in hidden:
        x = keras.layers.Dense(units, activation=activation)(x)
    return kw.Model(inputs, keras.layers.Dense(5)(x))


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
@pytest.mark.parametrize("hidden", [(), (12,), (12, 9)])
def test_exact_slope_equals_svd_of_brute_force_jacobian(activation, hidden):
    model = _mlp(activation, hidden)
    x = np.random.default_rng(0).normal(size=(7, 4, 4, 1)).astype("float32")
    expected = _brute_force_slope(model, x)
    np.testing.assert_allclose(slope(model, x, method="exact", batch_size=3), expected, rtol=2e-5)
    np.testing.assert_allclose(slope(model, x, method="jacobian"), expected, rtol=2e-5)


def test_slope_of_a_cnn_and_a_resnet_uses_the_full_jacobian():
    x = np.random.default_rng(1).random((4, 8, 8, 1)).astype("float32")
    for model in (
        kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(3,), dense_units=6, num_classes=4),
        kw.architectures.small_resnet(input_shape=(8, 8, 1), channels=3, num_blocks=1, num_classes=4),
    ):
        np.testing.assert_allclose(slope(model, x), _brute_force_slope(model, x), rtol=2e-5)
        with pytest.raises(kw.structure.StructureError):
            slope(model, x, method="exact")


def test_slope_of_a_linear_model_is_the_spectral_norm_of_its_matrix():
    model = _mlp(hidden=())
    kernel = model.layers[-1].kernel.numpy().astype(np.float64)
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype("float32")
    np.testing.assert_allclose(slope(model, x), np.linalg.norm(kernel, 2), rtol=1e-5)


def test_slope_is_invariant_under_the_weissi_scale_shift():
    model = _mlp("relu", (12, 9), seed=3)
    x = np.random.default_rng(2).normal(size=(16, 4, 4, 1)).astype("float32")
    shifted = scale_shift(model, [4.0, 0.1, 2.5])
    np.testing.assert_allclose(shifted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(shifted.layers[2].kernel.numpy(), model.layers[2].kernel.numpy())
    np.testing.assert_allclose(slope(shifted, x), slope(model, x), rtol=1e-4)
    # A non-function-preserving rescaling changes it (the test can fail).
    model.layers[2].kernel.assign(model.layers[2].kernel * 4.0)
    assert not np.allclose(slope(model, x), slope(shifted, x), rtol=1e-2)


def test_upsampled_inputs_through_an_averaging_layer_scale_the_slope_by_one_over_k():
    # f_k(x) = f(avgpool_k(x)): the same function on k×-upsampled images; its slope is slope / k exactly
    # (the k² pixels of a block share one input: the Jacobian rows are spread over k² entries of 1/k²).
    model = _mlp("relu", (12,))
    inputs = keras.Input((8, 8, 1))
    wrapped = keras.Model(inputs, model(keras.layers.AveragePooling2D(2)(inputs)))
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 1)).astype("float32")
    upsampled = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(slope(wrapped, upsampled), slope(model, x) / 2.0, rtol=1e-5)


def test_distribution_summary():
    model = _mlp()
    x = np.random.default_rng(0).normal(size=(40, 4, 4, 1)).astype("float32")
    summary = slope_distribution(model, x, quantiles=(0.1, 0.5, 0.9), bins=7)
    values = summary["values"]
    assert summary["mean"] == pytest.approx(values.mean())
    assert summary["quantiles"][0.5] == pytest.approx(np.median(values))
    assert summary["histogram"].sum() == 40 and len(summary["bin_edges"]) == 8


def test_bad_input():
    model = _mlp()
    with pytest.raises(ValueError, match="method"):
        slope(model, np.zeros((2, 4, 4, 1), np.float32), method="svd")
    with pytest.raises(TypeError, match="floating point"):
        slope(model, np.zeros((2, 4, 4, 1), np.int32))
    with pytest.raises(ValueError, match="quantiles"):
        slope_distribution(model, np.zeros((2, 4, 4, 1), np.float32), quantiles=(1.5,))


def test_dataset_complexity_ranks_real_data_sets(data_dir):
    # Two epochs: after one (16 steps) the test accuracy sits around 0.5–0.6 and depends on the seed's stream,
    # which differs between backends; after two it is 0.64–0.78 on TensorFlow and JAX.
    results = kw.experiments.dataset_complexity(
        ("mnist", "fashion_mnist"), data_dir=data_dir, hidden_units=(32,), epochs=2, num_train=2000, num_points=100
    )
    assert [r["dataset"] for r in results] == sorted([r["dataset"] for r in results], key=lambda n: [r["median"] for r in results if r["dataset"] == n][0])
    assert {r["dataset"] for r in results} == {"mnist", "fashion_mnist"}
    assert all(r["median"] > 0 and 0.5 < r["test_accuracy"] <= 1 for r in results)


def test_spectral_norm_precision_follows_the_backend():
    # σ_max is solved in float64 on TensorFlow (and on JAX with jax_enable_x64); on JAX by default in float32,
    # as the module docstring says: still within 1e-5 of NumPy's float64 SVD.
    from keras_wssi.analysis import _compute
    from keras_wssi.analysis.slope import spectral_norm_from_jacobian

    if backend.BACKEND == "jax":
        import jax

        float64 = bool(jax.config.read("jax_enable_x64"))
    else:
        float64 = True
    assert _compute.precise_dtype() == ("float64" if float64 else "float32")
    jacobian = np.random.default_rng(0).normal(size=(6, 5, 16))
    values = spectral_norm_from_jacobian(jacobian)
    assert values.dtype == np.float64
    np.testing.assert_allclose(values, np.linalg.norm(jacobian, ord=2, axis=(1, 2)), rtol=1e-12 if float64 else 1e-5)
