"""Accuracy under random and adversarial weight perturbations: restoration, consistency with the certificate."""

import contextlib

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from _testing import BACKEND
from keras_wssi.analysis import weight_perturbation as wp
from keras_wssi.evaluation.weight_perturbation import evaluate_weight_perturbations
from keras_wssi.evaluation.weight_perturbation import project_to_ball
from keras_wssi.evaluation.weight_perturbation import steepest_ascent_vertex


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")
    model = kw.architectures.mlp(input_shape=(6,), hidden_units=(16,), num_classes=3)
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    return model, x, y


def _snapshot(model):
    return [v.numpy().tobytes() for v in model.variables]


@pytest.mark.parametrize("kind,norm", [("random", "inf"), ("adversarial", "1"), ("adversarial", "2"), ("random", "2")])
def test_weights_restored_bit_exactly_and_curve_shape(trained, kind, norm):
    model, x, y = trained
    before = _snapshot(model)
    clean = float(np.mean(np.argmax(model.predict(x, verbose=0), 1) == y))
    result = evaluate_weight_perturbations(model, x, y, [0.0, 0.05, 0.5], kind=kind, norm=norm, per_layer=True, batch_size=128, num_draws=2, steps=5)
    assert _snapshot(model) == before
    assert result["epsilons"] == [0.0, 0.05, 0.5]
    assert result["accuracy"][0] == pytest.approx(clean)
    assert set(result["per_layer"]) == {"dense_0", "logits"}
    assert result["settings"]["kind"] == kind and result["settings"]["norm"] == norm
    assert result["accuracy"][2] < clean  # ε = 0.5 · ||W_l|| does damage


def test_weights_restored_when_evaluation_fails(trained):
    model, x, y = trained
    before = _snapshot(model)
    with pytest.raises(ValueError):
        evaluate_weight_perturbations(model, x, y[:10], [0.1])
    assert _snapshot(model) == before


def test_adversarial_is_stronger_than_random_and_certified_is_weakest(trained):
    model, x, y = trained
    epsilon = 0.02
    random = evaluate_weight_perturbations(model, x, y, [epsilon], kind="random", relative=False, num_draws=4)
    adversarial = evaluate_weight_perturbations(model, x, y, [epsilon], kind="adversarial", relative=False, steps=10, batch_size=300)
    certified = wp.certified_accuracy(model, x, y, epsilon, mode="activation")
    assert certified <= adversarial["accuracy"][0] <= random["accuracy"][0] + 1e-9
    strong = evaluate_weight_perturbations(model, x, y, [0.2], kind="adversarial", steps=10, batch_size=300)
    weak = evaluate_weight_perturbations(model, x, y, [0.2], kind="random", num_draws=2)
    assert strong["accuracy"][0] < weak["accuracy"][0]


def test_chosen_layers_and_seeds(trained):
    model, x, y = trained
    a = evaluate_weight_perturbations(model, x, y, [0.3], layers=["logits"], seed=3, distribution="gaussian")
    b = evaluate_weight_perturbations(model, x, y, [0.3], layers=["logits"], seed=3, distribution="gaussian")
    assert a["accuracy"] == b["accuracy"] and a["settings"]["layers"] == ["logits"]


def test_cnn_models_are_supported():
    keras.utils.set_random_seed(0)
    model = kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(3,), dense_units=5, num_classes=3)
    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype("float32")
    y = np.arange(20) % 3
    before = _snapshot(model)
    for kind in ("random", "adversarial"):
        result = evaluate_weight_perturbations(model, x, y, [0.0, 0.1], kind=kind, steps=3, num_draws=1)
        assert len(result["accuracy"]) == 2
    assert _snapshot(model) == before


def _float64():
    """Float64 arithmetic for these float64 inputs: JAX needs x64 enabled for it (scoped to this block)."""
    if BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("norm", ["inf", "1", "2"])
def test_projection_and_steepest_ascent(norm):
    with _float64():
        _check_projection_and_steepest_ascent(norm)


def _check_projection_and_steepest_ascent(norm):
    rng = np.random.default_rng(1)
    matrices = ops.convert_to_tensor(rng.normal(size=(4, 5, 3)))
    assert keras.backend.standardize_dtype(matrices.dtype) == "float64"
    projected = ops.convert_to_numpy(project_to_ball(matrices, 0.5, norm))
    norms = [float(wp.operator_norm(m, norm)) for m in projected]
    np.testing.assert_allclose(norms, 0.5, rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(project_to_ball(projected, 0.5, norm)), projected, atol=1e-12)  # idempotent
    inside = matrices * 1e-3
    np.testing.assert_allclose(ops.convert_to_numpy(project_to_ball(inside, 0.5, norm)), ops.convert_to_numpy(inside), atol=1e-15)
    matrices = ops.convert_to_numpy(matrices)
    # Projection: no point of the ball (random ones) is closer than the projection.
    for _ in range(50):
        candidate = ops.convert_to_numpy(project_to_ball(ops.convert_to_tensor(rng.normal(size=(4, 5, 3))), 0.5, norm))
        assert np.all(((candidate - matrices) ** 2).sum((1, 2)) >= ((projected - matrices) ** 2).sum((1, 2)) - 1e-9)
    vertex = ops.convert_to_numpy(steepest_ascent_vertex(matrices, 0.5, norm))
    value = (vertex * matrices).sum((1, 2))
    m = np.abs(matrices)
    # max over the ball of ⟨G, Δ⟩ is radius × the dual norm of G.
    dual = {
        "inf": m.max(axis=1).sum(axis=1),  # Σ over output units of the largest |entry| of its column
        "1": m.max(axis=2).sum(axis=1),
        "2": np.linalg.svd(matrices, compute_uv=False).sum(axis=1),  # nuclear norm
    }[norm]
    np.testing.assert_allclose(value, 0.5 * dual, rtol=1e-6)


def test_bad_input_gets_clear_errors(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="epsilons.*non-negative"):
        evaluate_weight_perturbations(model, x, y, [0.1, -0.1])
    with pytest.raises(ValueError, match="layers.*'nope'.*do not exist"):
        evaluate_weight_perturbations(model, x, y, [0.1], layers=["nope"])
    with pytest.raises(ValueError, match="kind"):
        evaluate_weight_perturbations(model, x, y, [0.1], kind="worst")
    with pytest.raises(ValueError, match="distribution"):
        evaluate_weight_perturbations(model, x, y, [0.1], distribution="cauchy")
    with pytest.raises(ValueError, match="norm"):
        evaluate_weight_perturbations(model, x, y, [0.1], norm="fro")
