"""A robustness report over several models: JSON with every number and its settings, PNG plots, Markdown.

Curves of any family share one shape, `{"epsilons": [...], "accuracy": [...], "settings": {...}}`: attack
curves (`AttackRunner.robust_accuracy`), noise curves (`noise_accuracy`) and weight-perturbation curves
(`keras_wssi.evaluation.weight_perturbation`) all go in through `Report.add_curve`.
"""

import datetime
import json
import math
import os

import numpy as np

from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.version import __version__

__all__ = ["Report", "load_report"]

_FILES = {"json": "report.json", "markdown": "summary.md", "plot": "accuracy_vs_epsilon.png"}


def _jsonable(value, where):
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            raise EvaluationError(f"{where} is NaN: the report refuses to record a NaN.")
        return value
    if value is None or isinstance(value, str):
        return value
    return str(value)


class Report:
    """Collects clean metrics, curves and notes for several models and writes them side by side.

    Args:
        title: the report's heading.
        settings: run-wide settings to record (data set, number of examples, seeds, commands, …).

    Example:

    ```python
    report = Report("MNIST robustness", settings={"dataset": "mnist", "examples": 1000})
    report.add_model("weissi", source="runs/weissi/model.keras")
    report.set_metrics("weissi", "clean", clean_metrics(model, x_test, y_test))
    report.add_curve("weissi", "attack/pgd", runner.robust_accuracy(x_test, y_test, [0, 0.1]))
    paths = report.save("reports/mnist")   # report.json, summary.md, accuracy_vs_epsilon.png, plots/*.png
    ```
    """

    def __init__(self, title="Robustness report", settings=None):
        self.title = str(title)
        self.settings = dict(settings or {})
        self.models = {}

    def add_model(self, name, source=None, notes=None):
        """Registers a model column of the report (call once per model, before its metrics and curves)."""
        if not isinstance(name, str) or not name:
            raise EvaluationError(f"model name must be a non-empty string, got {name!r}.")
        if name in self.models:
            raise EvaluationError(f"model name {name!r} is already in the report: names must be unique.")
        self.models[name] = {"source": source, "metrics": {}, "curves": {}, "notes": list(notes or [])}
        return self.models[name]

    def _model(self, name):
        if name not in self.models:
            raise EvaluationError(f"Unknown model {name!r}: call add_model({name!r}) first (have {list(self.models)}).")
        return self.models[name]

    def set_metrics(self, name, section, values):
        """Records a dict of scalar metrics (e.g. section `"clean"`, `"train"`, `"jacobian"`) for a model."""
        if not isinstance(values, dict):
            raise EvaluationError(f"values of section {section!r} must be a dict, got {type(values).__name__}.")
        self._model(name)["metrics"][section] = _jsonable(values, f"{name}.{section}")

    def add_note(self, name, note):
        """Adds a note (what was skipped, recovered or approximated) to a model."""
        self._model(name)["notes"].append(str(note))

    def add_curve(self, name, family, curve):
        """Adds an accuracy-versus-ε curve of one family (`"attack/pgd"`, `"noise/gaussian"`, …) to a model.

        Args:
            name: model name (from `add_model`).
            family: the curve's family; one plot per family, one line per model.
            curve: `{"epsilons": [...], "accuracy": [...], "settings": {...}}` plus optional extra keys.
        """
        if not isinstance(family, str) or not family:
            raise EvaluationError(f"family must be a non-empty string, got {family!r}.")
        if not isinstance(curve, dict) or "epsilons" not in curve or "accuracy" not in curve:
            raise EvaluationError(
                f"curve for {family!r} must be a dict with 'epsilons' and 'accuracy' lists, got "
                f"{sorted(curve) if isinstance(curve, dict) else type(curve).__name__}."
            )
        epsilons, accuracy = list(curve["epsilons"]), list(curve["accuracy"])
        if len(epsilons) != len(accuracy) or not epsilons:
            raise EvaluationError(
                f"curve for {family!r} has {len(epsilons)} epsilons and {len(accuracy)} accuracies: they must match "
                "and not be empty."
            )
        for value in accuracy:
            if not (isinstance(value, (int, float, np.floating, np.integer)) and 0.0 <= float(value) <= 1.0):
                raise EvaluationError(f"curve for {family!r} has accuracy {value!r}, expected a number in [0, 1].")
        self._model(name)["curves"][family] = _jsonable(curve, f"{name}.{family}")

    @property
    def families(self):
        """Curve families in first-seen order."""
        seen = []
        for model in self.models.values():
            for family in model["curves"]:
                if family not in seen:
                    seen.append(family)
        return seen

    def to_dict(self):
        """The whole report as a JSON-ready dict."""
        return {
            "title": self.title,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "keras_wssi_version": __version__,
            "settings": _jsonable(self.settings, "settings"),
            "models": self.models,
        }

    # -- Markdown ----------------------------------------------------------------------------------------

    def markdown(self):
        """The summary: one table of clean metrics, then one table per curve family (models × ε)."""
        lines = [f"# {self.title}", ""]
        if self.settings:
            lines += ["Settings: " + ", ".join(f"{k}={_short(v)}" for k, v in self.settings.items()), ""]
        lines += [
            "| model | test acc | test loss | train acc | train loss | gap (acc) | gap (loss) | mean ‖J‖₂ | mean ‖J‖_F |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, model in self.models.items():
            metrics = model["metrics"]
            clean, train = metrics.get("clean", {}), metrics.get("train", {})
            gap, jacobian = metrics.get("generalization_gap", {}), metrics.get("jacobian", {})
            lines.append(
                f"| {name} | {_fmt(clean.get('accuracy'))} | {_fmt(clean.get('loss'))} | {_fmt(train.get('accuracy'))} "
                f"| {_fmt(train.get('loss'))} | {_fmt(gap.get('accuracy'))} | {_fmt(gap.get('loss'))} "
                f"| {_fmt(jacobian.get('spectral_norm_mean'))} | {_fmt(jacobian.get('frobenius_norm_mean'))} |"
            )
        for family in self.families:
            epsilons = []
            for model in self.models.values():
                for eps in model["curves"].get(family, {}).get("epsilons", []):
                    if eps not in epsilons:
                        epsilons.append(eps)
            lines += ["", f"## {family}", ""]
            settings = next(m["curves"][family]["settings"] for m in self.models.values()
                            if family in m["curves"] and "settings" in m["curves"][family])
            lines += [f"Settings: {_settings_line(settings)}", ""]
            lines.append("| model | " + " | ".join(f"ε={_fmt(e)}" for e in epsilons) + " |")
            lines.append("|---|" + "---|" * len(epsilons))
            for name, model in self.models.items():
                curve = model["curves"].get(family)
                if curve is None:
                    continue
                by_eps = dict(zip(curve["epsilons"], curve["accuracy"]))
                lines.append(f"| {name} | " + " | ".join(_fmt(by_eps.get(e)) for e in epsilons) + " |")
        notes = [(name, note) for name, model in self.models.items() for note in model["notes"]]
        if notes:
            lines += ["", "## Notes", ""] + [f"- {name}: {note}" for name, note in notes]
        return "\n".join(lines) + "\n"

    # -- plots -------------------------------------------------------------------------------------------

    def plot(self, path, families=None, dpi=80):
        """Writes one figure with a panel per family (accuracy vs ε, one line per model) to `path`."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        families = list(families or self.families)
        if not families:
            raise EvaluationError("The report has no curves to plot: add_curve() first.")
        columns = min(3, len(families))
        rows = -(-len(families) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
        for axis, family in zip(axes.flat, families):
            for name, model in self.models.items():
                curve = model["curves"].get(family)
                if curve is not None:
                    axis.plot(curve["epsilons"], curve["accuracy"], marker="o", markersize=3, label=name)
            norm = next((m["curves"][family].get("settings", {}).get("norm") for m in self.models.values()
                         if family in m["curves"]), None)
            axis.set_title(family, fontsize=10)
            axis.set_xlabel(f"ε ({norm})" if norm else "ε / level")
            axis.set_ylabel("accuracy")
            axis.set_ylim(-0.02, 1.02)
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(families):]:
            axis.axis("off")
        axes.flat[0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=dpi)
        plt.close(figure)
        return path

    def save(self, output_dir):
        """Writes `report.json`, `summary.md`, `accuracy_vs_epsilon.png` and `plots/<family>.png`.

        Returns:
            dict of the written paths (`"json"`, `"markdown"`, `"plot"`, `"family_plots"`).
        """
        if not self.models:
            raise EvaluationError("The report has no models: add_model() first.")
        os.makedirs(output_dir, exist_ok=True)
        paths = {key: os.path.join(output_dir, file) for key, file in _FILES.items()}
        with open(paths["json"], "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
        with open(paths["markdown"], "w", encoding="utf-8") as handle:
            handle.write(self.markdown())
        paths["family_plots"] = {}
        if self.families:
            self.plot(paths["plot"])
            plot_dir = os.path.join(output_dir, "plots")
            os.makedirs(plot_dir, exist_ok=True)
            for family in self.families:
                file = os.path.join(plot_dir, family.replace("/", "_") + ".png")
                paths["family_plots"][family] = self.plot(file, families=[family])
        else:
            del paths["plot"]
        return paths


def load_report(path):
    """Reads a `report.json` (or the folder holding it) back into a `Report`, e.g. to merge runs or re-plot.

    Example:

    ```python
    report = load_report("reports/mnist")
    report.plot("accuracy.png", families=["attack/pgd"])
    ```
    """
    if os.path.isdir(path):
        path = os.path.join(path, _FILES["json"])
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    for key in ("title", "settings", "models"):
        if key not in data:
            raise EvaluationError(f"{path} is not a keras_wssi report: it has no {key!r}.")
    report = Report(data["title"], data["settings"])
    report.models = data["models"]
    return report


def _fmt(value):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    value = float(value)
    if value == 0:
        return "0"
    if abs(value) >= 100 or abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.4g}"


def _short(value):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) < 80 else text[:77] + "..."


def _settings_line(settings):
    skip = {"examples_used"}
    return ", ".join(f"{k}={_short(v)}" for k, v in settings.items() if k not in skip)
