"""The report: JSON with every number, Markdown tables, PNG plots, several models side by side."""

import json
import os

import keras
import numpy as np
import pytest

from keras_wssi import evaluation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curve(accuracy, norm="linf"):
    return {"epsilons": [0.0, 0.1, 0.2][: len(accuracy)], "accuracy": accuracy, "settings": {"norm": norm, "seed": 0}}


def _two_model_report():
    report = evaluation.Report("test report", settings={"dataset": "mnist", "test_examples": 3})
    for name, shift in (("plain", 0.0), ("weissi", 0.1)):
        report.add_model(name, source=f"runs/{name}/model.keras")
        report.set_metrics(name, "clean", {"accuracy": 0.9, "loss": np.float32(0.25), "examples": np.int64(3)})
        report.add_curve(name, "attack/pgd", _curve([0.9, 0.4 + shift, 0.1 + shift]))
        report.add_curve(name, "noise/gaussian", _curve([0.9, 0.8, 0.7 + shift], norm=None))
    # A weight-perturbation curve of the shape keras_wssi.evaluation.weight_perturbation returns.
    report.add_curve("weissi", "weights/random", {"epsilons": [0, 0.05], "accuracy": [0.9, 0.85],
                                                  "accuracy_std": [0.0, 0.01], "settings": {"kind": "random"}})
    report.add_note("weissi", "something worth knowing")
    return report


def test_report_files_are_written_and_valid(tmp_path):
    paths = _two_model_report().save(str(tmp_path / "out"))
    with open(paths["json"], encoding="utf-8") as handle:
        content = json.load(handle)
    assert set(content["models"]) == {"plain", "weissi"}
    weissi = content["models"]["weissi"]
    assert weissi["curves"]["attack/pgd"]["accuracy"] == pytest.approx([0.9, 0.5, 0.2])
    assert weissi["curves"]["attack/pgd"]["settings"]["seed"] == 0
    assert weissi["metrics"]["clean"]["loss"] == pytest.approx(0.25)
    assert content["settings"]["dataset"] == "mnist"
    markdown = open(paths["markdown"], encoding="utf-8").read()
    assert "| plain | 0.9 | 0.25 |" in markdown
    assert "## attack/pgd" in markdown and "| weissi | 0.9 | 0.5 | 0.2 |" in markdown
    assert "## weights/random" in markdown and "something worth knowing" in markdown
    for path in [paths["plot"], *paths["family_plots"].values()]:
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
        assert 1000 < os.path.getsize(path) < 200_000
    assert set(paths["family_plots"]) == {"attack/pgd", "noise/gaussian", "weights/random"}


def test_report_round_trips(tmp_path):
    report = _two_model_report()
    report.save(str(tmp_path))
    loaded = evaluation.load_report(str(tmp_path))
    assert loaded.models == json.loads(json.dumps(report.models))
    assert loaded.markdown() == report.markdown()


def test_bad_curves_and_models_are_refused():
    report = evaluation.Report()
    report.add_model("a")
    with pytest.raises(evaluation.EvaluationError, match="already in the report"):
        report.add_model("a")
    with pytest.raises(evaluation.EvaluationError, match="Unknown model 'b'"):
        report.add_curve("b", "attack/pgd", _curve([0.5]))
    with pytest.raises(evaluation.EvaluationError, match="2 epsilons and 1 accuracies"):
        report.add_curve("a", "attack/pgd", {"epsilons": [0, 1], "accuracy": [0.5]})
    with pytest.raises(evaluation.EvaluationError, match="'epsilons' and 'accuracy'"):
        report.add_curve("a", "attack/pgd", {"eps": [0]})
    with pytest.raises(evaluation.EvaluationError, match="accuracy 1.5"):
        report.add_curve("a", "attack/pgd", _curve([1.5]))
    with pytest.raises(evaluation.EvaluationError, match="is NaN"):
        report.set_metrics("a", "clean", {"loss": float("nan")})
    with pytest.raises(evaluation.EvaluationError, match="no models"):
        evaluation.Report().save("/tmp/never-written")


def test_evaluate_model_fills_every_section(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (40, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 40).astype(np.int32)
    inputs = keras.Input((6, 6, 1))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(inputs)))
    model = keras.Model(inputs, outputs)
    report = evaluation.Report("synthetic")
    evaluation.evaluate_model(
        report, "tiny", model, images, labels, attacks=["fgsm", evaluation.get_attack("pgd_l2", nb_iter=3)],
        linf_epsilons=[0.0, 0.1], l2_epsilons=[0.0, 0.5], noise_levels=[0.0, 0.2], train_images=images[:20],
        train_labels=labels[:20], jacobian_examples=8, batch_size=16, progress=False,
    )
    entry = report.models["tiny"]
    assert set(entry["curves"]) == {"attack/fgsm", "attack/pgd_l2", "noise/gaussian", "noise/uniform"}
    assert set(entry["metrics"]) >= {"clean", "train", "generalization_gap"}
    gap = entry["metrics"]["generalization_gap"]
    assert gap["accuracy"] == pytest.approx(entry["metrics"]["train"]["accuracy"] - entry["metrics"]["clean"]["accuracy"])
    if "jacobian" in entry["metrics"]:
        jacobian = entry["metrics"]["jacobian"]
        # ||J||_2 <= ||J||_F <= sqrt(C) ||J||_2 per example, hence for the means.
        assert jacobian["spectral_norm_mean"] <= jacobian["frobenius_norm_mean"] + 1e-9
        assert jacobian["frobenius_norm_mean"] <= np.sqrt(3) * jacobian["spectral_norm_mean"] + 1e-9
    else:
        assert any("Jacobian statistics skipped" in note for note in entry["notes"])
    for curve in entry["curves"].values():
        assert curve["accuracy"][0] == pytest.approx(entry["metrics"]["clean"]["accuracy"])
    report.save(str(tmp_path))


def test_plot_has_title_human_names_and_a_legend_in_every_panel():
    report = _two_model_report()
    report.add_curve("plain", "attack/square", {
        "epsilons": [0.0, 0.1], "accuracy": [0.9, 0.5],
        "settings": evaluation.get_attack("square", max_iter=300).settings() | {"examples": 10}})
    report.models["plain"]["curves"]["attack/pgd"]["settings"] = evaluation.get_attack("pgd", nb_iter=40).settings()
    figure = report.figure()
    assert figure._suptitle.get_text() == "test report — MNIST, L∞ attacks"
    panels = [axis for axis in figure.axes if axis.get_title()]
    titles = [axis.get_title() for axis in panels]
    assert titles == ["PGD-40 L∞", "Gaussian input noise", "Square (300 queries) L∞", "Random weight perturbation"]
    for axis in panels:
        legend = axis.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()] == [line.get_label() for line in axis.get_lines()]


def test_robustbench_fields_in_the_json(tmp_path):
    report = _two_model_report()
    report.models["plain"]["curves"]["attack/pgd"]["settings"] = dict(
        evaluation.get_attack("pgd", nb_iter=40, restarts=2).settings(), examples=3)
    report.set_threat_model("linf", 0.1)
    content = json.load(open(report.save(str(tmp_path))["json"], encoding="utf-8"))
    fields = content["robustbench"]["plain"]
    assert fields == fields | {"dataset": "mnist", "threat_model": "Linf", "eps": 0.1, "clean_acc": 0.9,
                               "robust_acc": 0.4, "ensemble_acc": None, "forward_passes": 3 * 2 * 41}
    (attack,) = fields["attacks"]
    assert attack["display_name"] == "PGD-40 ×2 restarts L∞" and attack["forward_passes_exact"] is True
    # Which code produced the number, on which backend.
    backend = keras.backend.backend()
    assert content["backend"] == backend and attack["backend"] == backend
    assert attack["implementation"].startswith(
        "cleverhans.tf2.attacks.projected_gradient_descent" if backend == "tensorflow"
        else "cleverhans.jax.attacks.projected_gradient_descent")
    with pytest.raises(evaluation.EvaluationError, match="norm must be"):
        report.set_threat_model("l1", 0.1)
