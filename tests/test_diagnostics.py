"""Gradient-masking diagnostics on real MNIST: a gradient-masked model is flagged, a normally trained one is not.

The masked model is the normally trained MLP behind a non-differentiable input quantization (8 gray levels):
its true gradient is zero almost everywhere, so FGSM and PGD see nothing to climb, while Square (gradient-free:
ART's on TensorFlow, keras_wssi's compiled one on JAX)
and PGD transferred from an unregularized surrogate still break it (Athalye, Carlini & Wagner 2018, §4.1).
Small budgets: 5,000 training images, 2 epochs, 200 test images, PGD-20/PGD-60×2, Square 300 queries on 100.
"""

import json

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from _testing import BACKEND
from keras_wssi import evaluation
from keras_wssi.evaluation import diagnostics

EXAMPLES = 200
SETTINGS = dict(epsilon=0.1, steps=20, strong_steps=60, strong_restarts=2, square_queries=300, square_examples=100,
                batch_size=200, seed=0)


def _quantize(x):
    levels = 7.0
    # The derivative of a step function is 0 almost everywhere; this is the exact gradient, not a trick.
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # A zero gradient, not an unconnected one (cleverhans.tf2 cannot take None).
        @tf.custom_gradient
        def quantize(x):
            return tf.round(x * levels) / levels, lambda upstream: tf.zeros_like(upstream)

        return quantize(x)
    return ops.stop_gradient(ops.round(x * levels) / levels)


class Quantize(keras.layers.Layer):
    def call(self, x):
        return _quantize(x)


def _mlp(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(128, activation="relu")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


def _train(model, images, labels):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(images, labels, batch_size=64, epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def mnist_models(data_dir):
    train_images, train_labels = kw.data.load_arrays("mnist", "train", data_dir=data_dir)
    test_images, test_labels = kw.data.load_arrays("mnist", "test", data_dir=data_dir)
    normal = _train(_mlp(0), train_images[:5000], train_labels[:5000])
    surrogate = _train(_mlp(1), train_images[5000:10000], train_labels[5000:10000])
    inputs = keras.Input((28, 28, 1))
    masked = keras.Model(inputs, normal(Quantize()(inputs)), name="quantized")
    return normal, masked, surrogate, test_images[:EXAMPLES], test_labels[:EXAMPLES]


def _by_name(result):
    return {check["check"]: check for check in result["checks"]}


def test_gradient_masked_model_is_flagged(mnist_models):
    normal, masked, surrogate, images, labels = mnist_models
    # The quantized model is as accurate as the plain one: the masking is not visible on clean data.
    assert evaluation.clean_metrics(masked, images, labels)["accuracy"] > 0.85
    result = diagnostics.gradient_masking_checks(masked, images, labels, surrogate=surrogate, **SETTINGS)
    checks = _by_name(result)
    assert not result["passed"]
    # Zero gradients: PGD cannot take the model anywhere, even when every image is reachable.
    assert checks["unbounded_epsilon"]["passed"] is False
    # Square and transferred PGD break what the white-box gradient attacks could not.
    assert checks["gradient_free_not_stronger"]["passed"] is False
    assert checks["transfer_not_stronger"]["passed"] is False
    assert checks["gradient_free_not_stronger"]["gradient_free"] < checks["gradient_free_not_stronger"]["white_box"] - 0.2
    assert "FAILS" in result["summary"] and "gradient_free_not_stronger" in result["summary"]


def test_normally_trained_model_passes(mnist_models):
    normal, masked, surrogate, images, labels = mnist_models
    result = diagnostics.gradient_masking_checks(normal, images, labels, surrogate=surrogate, **SETTINGS)
    assert result["passed"], result["summary"]
    assert all(check["passed"] for check in result["checks"]), result["checks"]
    assert result["summary"].startswith("the model passes all 5")
    attacks = {a["name"]: a for a in result["attacks"]}
    # Sanity of the recorded numbers: PGD at ε = 0.5 breaks everything; forward passes counted per example.
    assert attacks["PGD-20 L∞ at ε=0.5"]["accuracy"] < 0.02
    assert attacks["PGD-20 L∞"]["accuracy"] <= attacks["FGSM"]["accuracy"] + 0.05
    assert attacks["PGD-60 ×2 restarts L∞"]["settings"]["forward_passes"] == EXAMPLES * 2 * 61


def test_report_records_and_states_the_verdicts(mnist_models, tmp_path):
    normal, masked, surrogate, images, labels = mnist_models
    report = evaluation.Report("MNIST diagnostics", settings={"dataset": "mnist"})
    report.set_threat_model("linf", 0.1)
    for name, model in (("plain", normal), ("quantized", masked)):
        evaluation.evaluate_model(
            report, name, model, images, labels, attacks=["fgsm", evaluation.get_attack("pgd", nb_iter=10)],
            linf_epsilons=[0.0, 0.1], noise_kinds=(), jacobian_examples=0, batch_size=200, progress=False,
            diagnostics=dict(SETTINGS, strong_steps=20, square_queries=100, square_examples=50),
            surrogate=surrogate,
        )
    paths = report.save(str(tmp_path))
    content = json.load(open(paths["json"], encoding="utf-8"))
    assert content["models"]["plain"]["diagnostics"]["passed"] is True
    assert content["models"]["quantized"]["diagnostics"]["passed"] is False
    markdown = open(paths["markdown"], encoding="utf-8").read()
    assert "Pass: plain. Flagged: quantized." in markdown
    fields = content["robustbench"]["quantized"]
    assert fields["threat_model"] == "Linf" and fields["eps"] == 0.1 and fields["dataset"] == "mnist"
    # The robust accuracy is the worst case over every attack, including Square from the diagnostics? No: the
    # white-box worst case; Square's lower number is what the flag is about.
    assert fields["gradient_masking"]["passed"] is False


def test_extra_white_box_attack_joins_the_worst_case(mnist_models):
    normal, masked, surrogate, images, labels = mnist_models
    calls = []

    def break_everything(model, x, y, eps, norm, seed):
        calls.append((len(x), eps, norm, seed))
        return np.zeros(len(x), dtype=bool)

    # The hook the attack ensemble uses: registered once, it joins every run's white-box worst case.
    diagnostics.register_white_box_attack("oracle", break_everything, {"forward_passes": 0})
    try:
        result = diagnostics.gradient_masking_checks(
            masked, images[:50], labels[:50], **dict(SETTINGS, strong_steps=5, square_queries=20, square_examples=20))
    finally:
        del diagnostics.WHITE_BOX_ATTACKS["oracle"]
    assert calls == [(50, 0.1, "linf", 0)]
    assert result["white_box_accuracy"] == 0.0 and "oracle" in result["white_box_attacks"]
    # A white-box attack that breaks everything leaves Square nothing to beat: that check now passes.
    assert {c["check"]: c for c in result["checks"]}["gradient_free_not_stronger"]["passed"] is True
    with pytest.raises(evaluation.EvaluationError, match="must be callable"):
        diagnostics.register_white_box_attack("bad", None)
    with pytest.raises(evaluation.EvaluationError, match="one boolean per example"):
        bad = diagnostics.ExtraAttack("bad", lambda *args: np.zeros(3, dtype=bool))
        diagnostics.gradient_masking_checks(masked, images[:10], labels[:10], extra_attacks=[bad],
                                            **dict(SETTINGS, strong_steps=2, square_queries=5, square_examples=5))


def test_bad_settings_are_named(mnist_models):
    normal, _, _, images, labels = mnist_models
    with pytest.raises(evaluation.EvaluationError, match="large_epsilon"):
        diagnostics.gradient_masking_checks(normal, images, labels, epsilon=0.6)
    with pytest.raises(evaluation.EvaluationError, match="norm must be"):
        diagnostics.gradient_masking_checks(normal, images, labels, norm="l1")
    with pytest.raises(evaluation.EvaluationError, match="tolerance"):
        diagnostics.gradient_masking_checks(normal, images, labels, tolerance=2)
    with pytest.raises(evaluation.EvaluationError, match="epsilon must be > 0"):
        diagnostics.gradient_masking_checks(normal, images, labels, epsilon=0)
