"""The attack adapter: names, settings, logits, losses, seeded random starts (synthetic data, no training)."""

import keras
import numpy as np
import pytest
from keras import ops

from _testing import BACKEND
from _testing import tensorflow_only
from keras_wssi import evaluation
from keras_wssi.evaluation import attacks as attacks_module
from keras_wssi.evaluation import gradient_attacks


def _tiny_model(activation=None, softmax_layer=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(8, activation="relu")(x)
    if softmax_layer:
        x = keras.layers.Dense(3)(x)
        outputs = keras.layers.Softmax()(x)
    else:
        outputs = keras.layers.Dense(3, activation=activation)(x)
    return keras.Model(inputs, outputs)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 4, 4, 1)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def test_unknown_attack_name_is_refused():
    with pytest.raises(evaluation.EvaluationError, match="Unknown attack 'cw'.*expected one of"):
        evaluation.get_attack("cw")


def test_unknown_setting_is_refused():
    with pytest.raises(evaluation.EvaluationError, match="no setting 'steps'"):
        evaluation.get_attack("pgd", steps=10)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_epsilon_is_refused(bad):
    x, y = _data()
    runner = evaluation.AttackRunner(_tiny_model(), "fgsm", progress=False)
    with pytest.raises(evaluation.EvaluationError, match="epsilons must be finite and >= 0"):
        runner.robust_accuracy(x, y, [0.0, bad])


def test_empty_epsilon_list_is_refused():
    x, y = _data()
    with pytest.raises(evaluation.EvaluationError, match="epsilons is empty"):
        evaluation.AttackRunner(_tiny_model(), "fgsm", progress=False).robust_accuracy(x, y, [])


def test_step_size_must_not_exceed_epsilon():
    # cleverhans requires eps_iter <= eps; step_size is eps_iter / eps.
    with pytest.raises(evaluation.EvaluationError, match="step_size .* must be in \\(0, 1\\]"):
        evaluation.get_attack("pgd", step_size=1.5)


def test_restarts_need_a_random_start():
    with pytest.raises(evaluation.EvaluationError, match="restarts=3 .* deterministic"):
        evaluation.get_attack("bim", restarts=3)
    assert evaluation.get_attack("pgd", restarts=3).restarts == 3


def test_loss_only_where_cleverhans_takes_one():
    with pytest.raises(evaluation.EvaluationError, match="takes no loss argument"):
        evaluation.get_attack("mim", loss="sparse_categorical_crossentropy")


def test_settings_name_the_cleverhans_function():
    settings = evaluation.get_attack("pgd", nb_iter=20).settings()
    if BACKEND == "tensorflow":
        assert settings["function"] == "cleverhans.tf2.attacks.projected_gradient_descent"
    else:
        assert settings["function"].startswith("cleverhans.jax.attacks.projected_gradient_descent")
    assert settings["implementation"] == settings["function"] and settings["backend"] == BACKEND
    assert settings["library"] == "cleverhans"
    assert settings["eps_iter_over_eps"] == pytest.approx(2.5 / 20)
    assert evaluation.get_attack("square").settings()["library"] == "art"
    # On JAX, what cleverhans.jax lacks (or gets wrong: its L2 step ignores ε) is keras_wssi's transcription.
    for name in ("pgd_l2", "mim"):
        implementation = evaluation.get_attack(name).settings()["implementation"]
        assert implementation.startswith("cleverhans.tf2" if BACKEND == "tensorflow" else
                                         "keras_wssi.evaluation.gradient_attacks.cleverhans_tf2_transcription")


@pytest.mark.skipif(BACKEND == "tensorflow", reason="JAX behaviour: ART wraps TensorFlow models only")
@pytest.mark.parametrize("name,replacement", [("square", "square_compiled'"), ("square_l2", "square_compiled_l2"),
                                              ("cw_l2", "fab_t_l2")])
def test_art_attacks_on_jax_name_the_replacement(name, replacement):
    with pytest.raises(evaluation.EvaluationError, match=f"Attack '{name}'.*no JAX implementation.*{replacement}"):
        evaluation.AttackRunner(_tiny_model(), name, progress=False)


def test_softmax_model_is_refused_with_a_clear_error():
    x, y = _data()
    for model in (_tiny_model("softmax"), _tiny_model(softmax_layer=True)):
        with pytest.raises(evaluation.EvaluationError, match="outputs probabilities .* need logits"):
            evaluation.AttackRunner(model, "fgsm", progress=False).robust_accuracy(x, y, [0.1])


def test_softmax_detected_numerically_for_subclassed_models():
    class Probabilities(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)
            self.flatten = keras.layers.Flatten()

        def call(self, x, training=False):
            return ops.softmax(self.dense(self.flatten(x)))

    x, _ = _data()
    with pytest.raises(evaluation.EvaluationError, match="outputs probabilities"):
        evaluation.logits_function(Probabilities(), x)


@pytest.mark.parametrize("softmax_layer", [False, True])
def test_logit_recovery_is_exact_and_announced(softmax_layer):
    x, _ = _data()
    model = _tiny_model(None if softmax_layer else "softmax", softmax_layer=softmax_layer)
    with pytest.warns(UserWarning, match="recovered exactly"):
        logits_fn, note = evaluation.logits_function(model, x, recover_logits=True)
    assert "exactly" in note
    logits = ops.convert_to_numpy(logits_fn(ops.convert_to_tensor(x)))
    np.testing.assert_allclose(ops.convert_to_numpy(ops.softmax(logits)), ops.convert_to_numpy(model(x)), atol=1e-6)


def test_logit_model_passes_through():
    x, _ = _data()
    model = _tiny_model()
    logits_fn, note = evaluation.logits_function(model, x)
    assert note == ""
    np.testing.assert_allclose(ops.convert_to_numpy(logits_fn(x)), ops.convert_to_numpy(model(x)))


def test_keras_loss_adapted_to_cleverhans_call():
    loss_fn = attacks_module._adapt_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = np.array([0, 2])
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
    # Softmax cross-entropy, in float64 NumPy.
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    expected = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(2), labels])
    labels, logits = ops.convert_to_tensor(labels), ops.convert_to_tensor(logits)
    np.testing.assert_allclose(ops.convert_to_numpy(loss_fn(labels=labels, logits=logits)), expected, rtol=1e-6)
    by_name = attacks_module._adapt_loss("sparse_categorical_crossentropy")
    np.testing.assert_allclose(
        np.mean(ops.convert_to_numpy(by_name(labels=labels, logits=logits))), expected, rtol=1e-6
    )
    with pytest.raises(evaluation.EvaluationError, match="from_logits=False"):
        attacks_module._adapt_loss(keras.losses.SparseCategoricalCrossentropy())


def test_custom_loss_changes_the_attack():
    # A loss that ignores the logits gives zero gradient, so FGSM leaves the images unchanged.
    x, y = _data()

    def zero_loss(labels, logits):
        return 0.0 * ops.sum(logits)

    runner = evaluation.AttackRunner(_tiny_model(), evaluation.get_attack("fgsm", loss=zero_loss), progress=False)
    np.testing.assert_allclose(runner.generate(x, y, 0.3), x)


@tensorflow_only("cleverhans.tf2's PGD random start (seeded_random_start patches cleverhans.tf2)")
@pytest.mark.parametrize("norm", [np.inf, 2])
def test_seeded_random_start_lies_in_the_ball_and_is_batch_independent(norm):
    import tensorflow as tf
    from cleverhans.tf2.attacks import projected_gradient_descent as pgd_module

    shape = tf.constant([6, 4, 4, 1])
    with evaluation.seeded_random_start(5, 0, tf.range(6)):
        whole = pgd_module.random_lp_vector(shape, norm, tf.constant(0.3)).numpy()
    with evaluation.seeded_random_start(5, 0, tf.range(3, 6)):
        tail = pgd_module.random_lp_vector(tf.constant([3, 4, 4, 1]), norm, tf.constant(0.3)).numpy()
    with evaluation.seeded_random_start(5, 1, tf.range(6)):
        other_restart = pgd_module.random_lp_vector(shape, norm, tf.constant(0.3)).numpy()
    # The module's own sampler is restored on exit.
    assert pgd_module.random_lp_vector is not attacks_module._stateless_random_lp_vector
    np.testing.assert_array_equal(whole[3:], tail)
    assert not np.allclose(whole, other_restart)
    flat = whole.reshape(6, -1)
    norms = np.abs(flat).max(axis=1) if norm == np.inf else np.linalg.norm(flat, axis=1)
    assert np.all(norms <= 0.3 + 1e-6)
    assert np.all(norms > 0.05)


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_own_random_start_lies_in_the_ball_and_is_batch_independent(norm):
    # The start of PGD/Madry on JAX (cleverhans.jax's and the transcription's), keyed by (key, restart, index).
    x = np.zeros((6, 4, 4, 1), np.float32)

    def draw(indices, restart):
        return ops.convert_to_numpy(gradient_attacks._unit_ball_draw(x[: len(indices)], np.asarray(indices, np.int32),
                                                                     123, restart, norm))

    whole, tail, other_restart = draw(range(6), 0), draw(range(3, 6), 0), draw(range(6), 1)
    np.testing.assert_array_equal(whole[3:], tail)
    assert not np.allclose(whole, other_restart)
    flat = whole.reshape(6, -1)
    norms = np.abs(flat).max(axis=1) if norm == np.inf else np.linalg.norm(flat, axis=1)
    assert np.all(norms <= 1.0 + 1e-6)
    assert np.all(norms > 0.15)
