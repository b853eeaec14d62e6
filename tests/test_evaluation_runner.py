"""The batched, compiled runner on a small MLP trained on real MNIST: ε = 0, monotonicity, PGD ≥ FGSM,
norm balls and clip ranges, equality with direct cleverhans calls, seeds, noise and bad input."""

import numpy as np
import pytest
from keras import ops

from _testing import BACKEND
from _testing import small_trained_mlp
from _testing import tensorflow_only
from keras_wssi import evaluation
from keras_wssi.evaluation import gradient_attacks

N = 200
CLEVERHANS_ATTACKS = ["fgsm", "fgm_l2", "pgd", "pgd_l2", "bim", "mim", "madry"]
EPS = {"linf": 0.1, "l2": 1.0}


@pytest.fixture(scope="module")
def trained(data_dir):
    return small_trained_mlp(data_dir, N)


def _attack(name, nb_iter=10, **settings):
    if name in ("fgsm", "fgm_l2"):
        return evaluation.get_attack(name, **settings)
    return evaluation.get_attack(name, nb_iter=nb_iter, **settings)


def _norms(delta, norm):
    flat = delta.reshape(len(delta), -1).astype(np.float64)
    return np.abs(flat).max(axis=1) if norm == "linf" else np.linalg.norm(flat, axis=1)


def test_clean_metrics_match_keras_evaluate(trained):
    model, x, y = trained
    metrics = evaluation.clean_metrics(model, x, y, batch_size=64)
    loss, accuracy = model.evaluate(x, y, verbose=0)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert 0.7 < metrics["accuracy"] < 1.0


@pytest.mark.parametrize("name", CLEVERHANS_ATTACKS)
def test_zero_epsilon_gives_clean_accuracy(trained, name):
    model, x, y = trained
    clean = evaluation.clean_metrics(model, x, y)["accuracy"]
    attack = _attack(name, nb_iter=3)
    curve = evaluation.AttackRunner(model, attack, batch_size=128, progress=False).robust_accuracy(x, y, [0.0])
    assert curve["accuracy"] == [clean]
    assert curve["max_perturbation"] == [0.0]


@tensorflow_only("ART's attacks wrap TensorFlow models")
@pytest.mark.parametrize("name", ["square", "cw_l2"])
def test_zero_epsilon_gives_clean_accuracy_for_art_attacks(trained, name):
    pytest.importorskip("art")
    model, x, y = trained
    x, y = x[:20], y[:20]
    clean = evaluation.clean_metrics(model, x, y)["accuracy"]
    attack = evaluation.get_attack(name, max_iter=5, binary_search_steps=2) if name == "cw_l2" else evaluation.get_attack(name, max_iter=20)
    curve = evaluation.AttackRunner(model, attack, progress=False).robust_accuracy(x, y, [0.0, 0.2 if name == "square" else 2.0])
    assert curve["accuracy"][0] == pytest.approx(clean)
    assert curve["accuracy"][1] <= curve["accuracy"][0]


def test_pgd_accuracy_is_non_increasing_in_epsilon(trained):
    model, x, y = trained
    epsilons = [0.0, 0.02, 0.05, 0.08, 0.12, 0.2]
    curve = evaluation.AttackRunner(model, _attack("pgd", nb_iter=20), progress=False).robust_accuracy(x, y, epsilons)
    accuracy = curve["accuracy"]
    # One example of slack: a random start may save one example at the larger ε.
    assert all(b <= a + 1.0 / N for a, b in zip(accuracy, accuracy[1:])), accuracy
    assert accuracy[-1] < accuracy[0] - 0.3, accuracy


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_with_restarts_is_never_weaker_than_fgsm(trained, norm):
    model, x, y = trained
    epsilons = [0.05, 0.1] if norm == "linf" else [0.5, 1.0]
    fgsm = evaluation.AttackRunner(model, "fgsm" if norm == "linf" else "fgm_l2", progress=False)
    pgd = evaluation.AttackRunner(model, _attack("pgd" if norm == "linf" else "pgd_l2", nb_iter=20, restarts=3),
                                  progress=False)
    fgsm_curve = fgsm.robust_accuracy(x, y, epsilons)["accuracy"]
    pgd_curve = pgd.robust_accuracy(x, y, epsilons)["accuracy"]
    for eps, a_fgsm, a_pgd in zip(epsilons, fgsm_curve, pgd_curve):
        assert a_pgd <= a_fgsm + 1.0 / N, (eps, a_fgsm, a_pgd)
    # Per example: almost nothing FGSM breaks survives PGD.
    eps = epsilons[-1]
    fgsm_broken = np.argmax(model.predict(fgsm.generate(x, y, eps), verbose=0), 1) != y
    pgd_broken = np.argmax(model.predict(pgd.generate(x, y, eps), verbose=0), 1) != y
    assert np.mean(fgsm_broken & ~pgd_broken) <= 0.02


@pytest.mark.parametrize("name", CLEVERHANS_ATTACKS)
def test_perturbations_respect_the_norm_ball_and_clip_range(trained, name):
    model, x, y = trained
    attack = _attack(name, nb_iter=5)
    eps = EPS[attack.norm]
    x_adv = evaluation.AttackRunner(model, attack, batch_size=64, progress=False).generate(x, y, eps)
    assert x_adv.shape == x.shape
    assert np.all(_norms(x_adv - x, attack.norm) <= eps * (1 + 1e-5) + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() > 0.0


@tensorflow_only("ART's Square wraps TensorFlow models")
def test_square_respects_the_ball(trained):
    pytest.importorskip("art")
    model, x, y = trained
    runner = evaluation.AttackRunner(model, evaluation.get_attack("square", max_iter=10), progress=False)
    x_adv = runner.generate(x[:20], y[:20], 0.1)
    assert np.all(_norms(x_adv - x[:20], "linf") <= 0.1 + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def _direct_cleverhans(name, model, x, y, eps, nb_iter, seed, batch):
    """cleverhans's function called eagerly, batch by batch, as its documentation shows (true labels given)."""
    import tensorflow as tf
    from cleverhans.tf2.attacks.basic_iterative_method import basic_iterative_method
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.madry_et_al import madry_et_al
    from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    outputs = []
    model_fn = lambda t: model(t, training=False)  # noqa: E731
    for start in range(0, len(x), batch):
        xb, yb = tf.constant(x[start : start + batch]), tf.constant(y[start : start + batch])
        clip = {"clip_min": 0.0, "clip_max": 1.0}
        with evaluation.seeded_random_start(seed, 0, tf.range(start, start + len(xb))):
            if name == "fgsm":
                out = fast_gradient_method(model_fn, xb, eps, np.inf, y=yb, **clip)
            elif name == "fgm_l2":
                out = fast_gradient_method(model_fn, xb, eps, 2, y=yb, **clip)
            elif name in ("pgd", "pgd_l2", "pgd_l2_no_start"):
                norm = np.inf if name == "pgd" else 2
                out = projected_gradient_descent(model_fn, xb, eps, eps * 2.5 / nb_iter, nb_iter, norm, y=yb,
                                                 rand_init=name != "pgd_l2_no_start", **clip)
            elif name == "bim":
                out = basic_iterative_method(model_fn, xb, eps, eps * 2.5 / nb_iter, nb_iter, np.inf, y=yb,
                                             sanity_checks=False, **clip)
            elif name == "mim":
                out = momentum_iterative_method(model_fn, xb, eps, eps * 2.5 / nb_iter, nb_iter, np.inf, y=yb,
                                                sanity_checks=False, **clip)
            else:
                out = madry_et_al(model_fn, xb, eps, eps * 2.5 / nb_iter, nb_iter, np.inf, y=yb, rand_minmax=eps,
                                  sanity_checks=False, **clip)
        outputs.append(out.numpy())
    return np.concatenate(outputs)


@tensorflow_only("cleverhans.tf2 is the oracle (JAX: test_runner_matches_direct_cleverhans_jax_calls)")
@pytest.mark.parametrize("name", CLEVERHANS_ATTACKS)
def test_runner_matches_direct_cleverhans_calls(trained, name):
    model, x, y = trained
    nb_iter = 8
    attack = _attack(name, nb_iter=nb_iter)
    eps = EPS[attack.norm]
    # Different batch sizes on purpose: 128 (with a padded last batch) against 50.
    ours = evaluation.AttackRunner(model, attack, batch_size=128, seed=7, progress=False).generate(x, y, eps)
    reference = _direct_cleverhans(name, model, x, y, eps, nb_iter, seed=7, batch=50)
    np.testing.assert_allclose(ours, reference, atol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="cleverhans.jax runs on the JAX backend")
@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_runner_matches_direct_cleverhans_jax_calls(trained, name):
    # cleverhans.jax's own functions called directly, batch by batch (deterministic attacks: no random start).
    modules = gradient_attacks._cleverhans_jax()
    model, x, y = trained
    nb_iter, eps = 8, EPS["linf"]
    ours = evaluation.AttackRunner(model, _attack(name, nb_iter=nb_iter), batch_size=128, progress=False)
    ours = ours.generate(x, y, eps)
    reference = []
    for start in range(0, len(x), 50):
        xb, yb = x[start:start + 50], np.eye(10, dtype=np.float32)[y[start:start + 50]]
        model_fn = lambda t: model(t, training=False)  # noqa: E731
        if name == "fgsm":
            out = modules["fast_gradient_method"].fast_gradient_method(model_fn, xb, eps, np.inf, clip_min=0.0,
                                                                        clip_max=1.0, y=yb)
        else:
            out = modules["projected_gradient_descent"].projected_gradient_descent(
                model_fn, xb, eps, eps * 2.5 / nb_iter, nb_iter, np.inf, clip_min=0.0, clip_max=1.0, y=yb)
        reference.append(ops.convert_to_numpy(out))
    np.testing.assert_allclose(ours, np.concatenate(reference), atol=1e-6)


@pytest.mark.parametrize("name", ["fgsm", "fgm_l2", "bim", "mim", "pgd_l2"])
def test_transcription_matches_cleverhans(trained, name):
    # keras_wssi's keras.ops transcription of cleverhans.tf2 (what JAX runs where cleverhans.jax has no correct
    # attack) against cleverhans itself on the same model: cleverhans.tf2 on TensorFlow, cleverhans.jax (L∞) on
    # JAX. Deterministic settings (no random start), so the outputs must agree.
    model, x, y = trained
    x, y = x[:64], y[:64]
    nb_iter = 5
    attack = _attack(name, nb_iter=nb_iter, **({"rand_init": False} if name == "pgd_l2" else {}))
    eps = EPS[attack.norm]
    if BACKEND == "tensorflow":
        reference = _direct_cleverhans(name if name != "pgd_l2" else "pgd_l2_no_start", model, x, y, eps, nb_iter,
                                       seed=0, batch=64)
    elif attack.norm == "linf" and name != "mim":
        reference = evaluation.AttackRunner(model, attack, batch_size=64, progress=False).generate(x, y, eps)
    else:
        pytest.skip("cleverhans.jax has no correct L2 step and no MIM: the TensorFlow run checks these")
    ours = gradient_attacks.cleverhans_tf2_transcription(
        attack.method, lambda t: ops.cast(model(t, training=False), "float32"), x, y, eps, attack.ord,
        np.arange(len(x), dtype=np.int32), 0, 0, nb_iter=nb_iter, eps_iter=eps * attack.eps_iter_ratio(),
        rand_init=False, decay_factor=attack.decay_factor, clip_min=0.0, clip_max=1.0)
    np.testing.assert_allclose(ops.convert_to_numpy(ours), reference, atol=1e-5)


def test_seed_controls_random_starts(trained):
    model, x, y = trained
    x, y = x[:50], y[:50]
    attack = _attack("pgd", nb_iter=2)

    def run(seed, batch_size=32):
        return evaluation.AttackRunner(model, attack, batch_size=batch_size, seed=seed, progress=False).generate(x, y, 0.1)

    first = run(1)
    np.testing.assert_array_equal(first, run(1))
    np.testing.assert_allclose(first, run(1, batch_size=50), atol=1e-6)
    assert not np.allclose(first, run(2))


def test_xla_runner_agrees_with_graph_runner(trained):
    model, x, y = trained
    graph = evaluation.AttackRunner(model, "fgsm", progress=False).robust_accuracy(x, y, [0.05])["accuracy"][0]
    xla = evaluation.AttackRunner(model, "fgsm", jit_compile=True, progress=False).robust_accuracy(x, y, [0.05])
    # XLA reorders float sums, so a sign of a near-zero gradient component may flip: one example of slack.
    assert abs(xla["accuracy"][0] - graph) <= 1.0 / N
    assert xla["settings"]["jit_compile"] is True


def test_noise_accuracy(trained):
    model, x, y = trained
    clean = evaluation.clean_metrics(model, x, y)["accuracy"]
    for kind in evaluation.NOISE_KINDS:
        curve = evaluation.noise_accuracy(model, x, y, [0.0, 0.3, 2.0], kind=kind, batch_size=64, seed=3)
        assert curve["accuracy"][0] == clean
        assert curve["accuracy"][2] < clean - 0.2
        again = evaluation.noise_accuracy(model, x, y, [0.3], kind=kind, batch_size=200, seed=3)
        assert again["accuracy"][0] == curve["accuracy"][1]
    with pytest.raises(evaluation.EvaluationError, match="kind must be one of"):
        evaluation.noise_accuracy(model, x, y, [0.1], kind="salt")


def test_bad_input_gets_clear_errors(trained):
    model, x, y = trained
    runner = evaluation.AttackRunner(model, "fgsm", progress=False)
    with pytest.raises(evaluation.EvaluationError, match="dataset is empty"):
        runner.robust_accuracy(x[:0], y[:0], [0.1])
    with pytest.raises(evaluation.EvaluationError, match=r"per-example shape \(32, 32, 3\).*expects \(28, 28, 1\)"):
        runner.robust_accuracy(np.zeros((4, 32, 32, 3), np.float32), y[:4], [0.1])
    with pytest.raises(evaluation.EvaluationError, match="labels must be integer classes of shape \\(200,\\)"):
        runner.robust_accuracy(x, y[:10], [0.1])
    with pytest.raises(evaluation.EvaluationError, match="outside the clip range"):
        runner.robust_accuracy(x * 255.0, y, [0.1])
    with pytest.raises(evaluation.EvaluationError, match="batch_size must be a positive integer"):
        evaluation.AttackRunner(model, "fgsm", batch_size=0)
    with pytest.raises(evaluation.EvaluationError, match="dataset is empty"):
        evaluation.noise_accuracy(model, x[:0], y[:0], [0.1])
