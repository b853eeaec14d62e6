"""A robustness report over several models: JSON with every number and its settings, PNG plots, Markdown.

Besides the curves, every model gets RobustBench-style fields (`robustbench_entry`: clean accuracy, robust
accuracy at the report's threat model and ε, the attacks and their settings, forward passes) and, when
`keras_wssi.evaluation.diagnostics` ran, its gradient-masking checks, stated in words in the summary.
Plots carry the data set and threat model in their title, human attack names and a legend in every panel.

Curves of any family share one shape, `{"epsilons": [...], "accuracy": [...], "settings": {...}}`: attack
curves (`AttackRunner.robust_accuracy`), noise curves (`noise_accuracy`) and weight-perturbation curves
(`keras_wssi.evaluation.weight_perturbation`) all go in through `Report.add_curve`.
"""

import datetime
import json
import math
import os

import numpy as np

from keras_wssi import backend
from keras_wssi import structure
from keras_wssi.analysis.weight_perturbation import certified_accuracy_curve
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.version import __version__

__all__ = ["Report", "add_certified_weight_curve", "attack_display_name", "family_display_name", "load_report", "robustbench_entry"]

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

    def set_diagnostics(self, name, result):
        """Records the gradient-masking checks of a model (`diagnostics.gradient_masking_checks`'s result)."""
        if not isinstance(result, dict) or "checks" not in result or "passed" not in result:
            raise EvaluationError(
                f"diagnostics of {name!r} must be the dict gradient_masking_checks returns, got "
                f"{type(result).__name__}."
            )
        self._model(name)["diagnostics"] = _jsonable(result, f"{name}.diagnostics")

    def set_threat_model(self, norm, epsilon):
        """Sets the threat model of the RobustBench-style fields: `norm` (`"linf"`/`"l2"`) and `epsilon`."""
        if norm not in _THREAT_MODELS:
            raise EvaluationError(f"norm must be 'linf' or 'l2', got {norm!r}.")
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
            raise EvaluationError(f"epsilon must be a finite number > 0, got {epsilon!r}.")
        self.settings["threat_model"] = norm
        self.settings["epsilon"] = float(epsilon)

    def threat_model(self):
        """`(norm, epsilon)`: from `set_threat_model`, else L∞ at the median positive ε of the attack curves."""
        if "threat_model" in self.settings and "epsilon" in self.settings:
            return self.settings["threat_model"], float(self.settings["epsilon"])
        for norm in _THREAT_MODELS:
            epsilons = sorted({e for m in self.models.values() for c in m["curves"].values()
                               if c.get("settings", {}).get("norm") == norm for e in c["epsilons"] if e > 0})
            if epsilons:
                return norm, epsilons[(len(epsilons) - 1) // 2]
        return None, None

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
        norm, epsilon = self.threat_model()
        return {
            "title": self.title,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "keras_wssi_version": __version__,
            "backend": backend.BACKEND,
            "settings": _jsonable(self.settings, "settings"),
            "robustbench": {name: _jsonable(robustbench_entry(model, norm, epsilon, self.settings.get("dataset")),
                                            f"{name}.robustbench")
                            for name, model in self.models.items()},
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
            lines += ["", f"## {family}: {family_display_name(family, self._family_settings(family))}", ""]
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
        lines += self._robustbench_markdown() + self._diagnostics_markdown()
        notes = [(name, note) for name, model in self.models.items() for note in model["notes"]]
        if notes:
            lines += ["", "## Notes", ""] + [f"- {name}: {note}" for name, note in notes]
        return "\n".join(lines) + "\n"

    def _family_settings(self, family):
        return next((m["curves"][family].get("settings", {}) for m in self.models.values() if family in m["curves"]),
                    {})

    def _robustbench_markdown(self):
        norm, epsilon = self.threat_model()
        if norm is None:
            return []
        lines = ["", f"## RobustBench-style summary ({_THREAT_MODELS[norm]}, ε={_fmt(epsilon)})", "",
                 "| model | clean acc | robust acc | attacks at ε | forward passes |", "|---|---|---|---|---|"]
        for name, model in self.models.items():
            entry = robustbench_entry(model, norm, epsilon, self.settings.get("dataset"))
            attacks = ", ".join(f"{a['display_name']}: {_fmt(a['accuracy'])}" for a in entry["attacks"]) or "–"
            lines.append(f"| {name} | {_fmt(entry['clean_acc'])} | {_fmt(entry['robust_acc'])} | {attacks} "
                         f"| {_fmt(entry['forward_passes'])} |")
        lines += ["", "Robust accuracy: " + _ROBUST_ACC_METHOD + "."]
        return lines

    def _diagnostics_markdown(self):
        diagnosed = {name: m["diagnostics"] for name, m in self.models.items() if m.get("diagnostics")}
        if not diagnosed:
            return []
        first = next(iter(diagnosed.values()))
        lines = ["", "## Gradient-masking checks", "",
                 f"Athalye, Carlini & Wagner (2018) / Carlini et al. (2019), DESIGN.md §1.6; tolerance "
                 f"{_fmt(first.get('tolerance'))} accuracy; see docs/gradient_masking.md.", ""]
        names = [c["check"] for c in first["checks"]]
        lines.append("| model | verdict | " + " | ".join(names) + " |")
        lines.append("|---|---|" + "---|" * len(names))
        for name, result in diagnosed.items():
            by_name = {c["check"]: c for c in result["checks"]}
            cells = []
            for check in names:
                passed = by_name.get(check, {}).get("passed")
                cells.append("skipped" if passed is None else ("pass" if passed else "**FAIL**"))
            verdict = "passes" if result["passed"] else "**flagged**"
            lines.append(f"| {name} | {verdict} | " + " | ".join(cells) + " |")
        passing = [n for n, r in diagnosed.items() if r["passed"]]
        flagged = [n for n, r in diagnosed.items() if not r["passed"]]
        lines += ["", f"Pass: {', '.join(passing) or 'none'}. Flagged: {', '.join(flagged) or 'none'}.", ""]
        lines += [f"- {_summary_for(name, result)}" for name, result in diagnosed.items()]
        return lines

    # -- plots -------------------------------------------------------------------------------------------

    def figure(self, families=None):
        """A matplotlib `Figure`: one panel per family (accuracy vs ε, one line per model, a legend in each),
        titled with the data set and threat model (`plot_title`), panels named in words (`family_display_name`).

        Example:

        ```python
        figure = report.figure(["attack/pgd"])
        figure.axes[0].get_title()   # 'PGD-40 L∞'
        ```
        """
        from matplotlib.figure import Figure

        families = list(families or self.families)
        if not families:
            raise EvaluationError("The report has no curves to plot: add_curve() first.")
        columns = min(3, len(families))
        rows = -(-len(families) // columns)
        figure = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.4))
        axes = figure.subplots(rows, columns, squeeze=False)
        for axis, family in zip(axes.flat, families):
            for name, model in self.models.items():
                curve = model["curves"].get(family)
                if curve is not None:
                    axis.plot(curve["epsilons"], curve["accuracy"], marker="o", markersize=3, label=name)
            settings = self._family_settings(family)
            norm = settings.get("norm")
            axis.set_title(family_display_name(family, settings), fontsize=9)
            axis.set_xlabel(f"ε ({_THREAT_MODELS.get(norm, norm)})" if norm else _level_label(family, settings))
            axis.set_ylabel("accuracy")
            axis.set_ylim(-0.02, 1.02)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="best", framealpha=0.8)
        for axis in list(axes.flat)[len(families):]:
            axis.axis("off")
        figure.suptitle(self.plot_title(), fontsize=11)
        figure.tight_layout()
        return figure

    def plot(self, path, families=None, dpi=80):
        """Writes `figure(families)` to `path` (PNG)."""
        self.figure(families).savefig(path, dpi=dpi)
        return path

    def plot_title(self):
        """The figure title: report title, data set and threat model(s) (e.g. "… — MNIST, L∞ and L2 attacks")."""
        dataset = self.settings.get("dataset")
        norms = []
        for family in self.families:
            norm = self._family_settings(family).get("norm")
            if family.startswith("attack/") and norm in _THREAT_MODELS and _THREAT_MODELS[norm] not in norms:
                norms.append(_THREAT_MODELS[norm])
        parts = [_DATASET_NAMES.get(dataset, dataset)] if dataset else []
        if norms:
            parts.append(" and ".join(norms) + " attacks")
        return self.title + (" — " + ", ".join(parts) if parts else "")

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


_THREAT_MODELS = {"linf": "L∞", "l2": "L2"}
_ROBUSTBENCH_NORMS = {"linf": "Linf", "l2": "L2"}
_DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
_ROBUST_ACC_METHOD = (
    "the lowest accuracy over the attacks run at ε (a per-attack minimum, an upper bound of the per-example "
    "worst case), or the per-example worst case over the white-box attacks of the gradient-masking checks when "
    "they ran at the same ε and norm, whichever is lower; attacks may use different example counts (see 'examples')"
)
_METHOD_NAMES = {"fgm": "FGM", "pgd": "PGD", "bim": "BIM", "mim": "MIM", "madry": "PGD (Madry)", "cw_l2": "CW-L2",
                 "square": "Square"}


def attack_display_name(settings):
    """The name people use for an attack, from its recorded settings: "PGD-40 L∞", "Square (300 queries)", ….

    Args:
        settings: an attack's settings (`Attack.settings()` or a curve's `"settings"`); a `"display_name"` in
            them wins (e.g. set by the attack ensemble).

    Example:

    ```python
    attack_display_name(get_attack("pgd", nb_iter=40).settings())   # 'PGD-40 L∞'
    ```
    """
    if settings.get("display_name"):
        return str(settings["display_name"])
    method, norm = settings.get("method"), settings.get("norm")
    symbol = _THREAT_MODELS.get(norm, norm or "")
    if method == "fgm":
        return "FGSM" if norm == "linf" else f"FGM {symbol}"
    if method == "square":
        return f"Square ({settings.get('max_iter')} queries) {symbol}".strip()
    if method == "cw_l2":
        return f"CW-L2 ({settings.get('binary_search_steps')}×{settings.get('max_iter')} steps)"
    if method in _METHOD_NAMES:
        restarts = settings.get("restarts", 1)
        restart_text = f" ×{restarts} restarts" if restarts and restarts > 1 else ""
        return f"{_METHOD_NAMES[method]}-{settings.get('nb_iter')}{restart_text} {symbol}".strip()
    return str(settings.get("name") or method or "attack")


def family_display_name(family, settings=None):
    """A curve family in words: "attack/pgd" → "PGD-40 L∞", "noise/gaussian" → "Gaussian input noise"."""
    settings = settings or {}
    kind, _, rest = family.partition("/")
    if kind == "attack" and settings:
        return attack_display_name(settings)
    if kind == "noise":
        return f"{rest.capitalize()} input noise"
    if kind == "weights":
        return f"{rest.capitalize()} weight perturbation"
    return family


def _level_label(family, settings):
    if family.startswith("noise/"):
        return "noise level (" + str(settings.get("level", "σ or half-width")) + ")"
    if family.startswith("weights/"):
        return "relative weight perturbation ε"
    return "ε / level"


def _forward_passes(settings, examples):
    """Forward passes an attack spends at one ε: recorded by the attack when it says so, else derived from its
    settings (exact for fixed-step cleverhans attacks; an upper bound for Square, which stops early)."""
    if "forward_passes" in settings:
        return int(settings["forward_passes"]), bool(settings.get("exact", True))
    restarts = int(settings.get("restarts", 1) or 1)
    if settings.get("library") == "cleverhans":
        return examples * restarts * (int(settings.get("nb_iter", 1)) + 1), True
    if settings.get("method") == "square":
        return examples * restarts * (int(settings.get("max_iter", 0)) + 1), False
    if settings.get("method") == "cw_l2":
        return examples * int(settings.get("binary_search_steps", 1)) * (int(settings.get("max_iter", 0)) + 1), False
    return None, False


def robustbench_entry(model, norm, epsilon, dataset=None):
    """The RobustBench-style fields of one model entry of a report.

    Fields: `dataset`, `threat_model` (`"Linf"`/`"L2"`), `eps`, `clean_acc`, `robust_acc` (see the module's
    definition in `_ROBUST_ACC_METHOD`), `robust_acc_method`, `ensemble_acc` (accuracy of an attack whose
    settings say `"ensemble": true`, None until the ensemble runs), `attacks` (name, display name, accuracy at
    ε, examples, forward passes, settings), `forward_passes` (their sum) and `gradient_masking` (passed, failed
    checks) when diagnostics ran.

    Example:

    ```python
    robustbench_entry(report.models["weissi"], "linf", 0.1, "mnist")["robust_acc"]
    ```
    """
    clean = model.get("metrics", {}).get("clean", {}).get("accuracy")
    entry = {"dataset": dataset, "threat_model": _ROBUSTBENCH_NORMS.get(norm), "eps": epsilon, "clean_acc": clean,
             "robust_acc": None, "robust_acc_method": _ROBUST_ACC_METHOD, "ensemble_acc": None, "attacks": [],
             "forward_passes": None}
    if norm is None:
        return entry
    forward_total, accuracies = 0, []
    for family, curve in model.get("curves", {}).items():
        settings = curve.get("settings", {})
        if not family.startswith("attack/") or settings.get("norm") != norm:
            continue
        matches = [a for e, a in zip(curve["epsilons"], curve["accuracy"]) if abs(e - epsilon) <= 1e-9]
        if not matches:
            continue
        examples = int(settings.get("examples", 0) or 0)
        passes, exact = _forward_passes(settings, examples)
        forward_total += passes or 0
        entry["attacks"].append({"family": family, "display_name": attack_display_name(settings),
                                 "accuracy": matches[0], "examples": examples, "forward_passes": passes,
                                 "forward_passes_exact": exact, "implementation": settings.get("implementation"),
                                 "backend": settings.get("backend"), "settings": settings})
        accuracies.append(matches[0])
        if settings.get("ensemble"):
            entry["ensemble_acc"] = matches[0]
    ensemble = model.get("metrics", {}).get("autoattack")
    same_threat = ensemble and ensemble.get("threat_model") == ("Linf" if norm == "linf" else "L2")
    if same_threat and abs(float(ensemble.get("epsilon", -1.0)) - epsilon) <= 1e-9:
        # keras_wssi.evaluation.autoattack's result, recorded by examples/evaluate.py --autoattack.
        entry["ensemble_acc"] = ensemble["robust_accuracy"]
    diagnostics = model.get("diagnostics")
    if diagnostics:
        entry["gradient_masking"] = {"passed": diagnostics["passed"], "failed": diagnostics["failed"],
                                     "epsilon": diagnostics["epsilon"], "norm": diagnostics["norm"]}
        if diagnostics["norm"] == norm and abs(diagnostics["epsilon"] - epsilon) <= 1e-9:
            accuracies.append(diagnostics["white_box_accuracy"])
            for attack in diagnostics["attacks"]:
                if abs(attack["epsilon"] - epsilon) <= 1e-9 and "surrogate" not in attack["settings"]:
                    forward_total += attack["settings"].get("forward_passes", 0) or 0
            entry["attacks"].append({"family": "diagnostics/white_box_worst_case",
                                     "display_name": "worst case of " + ", ".join(diagnostics["white_box_attacks"]),
                                     "accuracy": diagnostics["white_box_accuracy"],
                                     "examples": diagnostics["examples"], "forward_passes": None,
                                     "forward_passes_exact": True, "settings": {}})
    if accuracies:
        entry["robust_acc"] = min(accuracies)
        entry["forward_passes"] = forward_total
    return entry


def _summary_for(name, result):
    text = result.get("summary", "")
    return text.replace("the model", name, 1) if text.startswith("the model") else text


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


def add_certified_weight_curve(report, name, model, images, labels, epsilons, norm="inf", relative=True, mode="linear", max_examples=1000):
    """Adds the *certified* accuracy under weight perturbations to `report` as the family `"weights/certified"`.

    The same radii, norm and relative scaling as `evaluate_weight_perturbations`'s curves
    (`"weights/random"`, `"weights/adversarial"`), so the plot shows what is proven below what is attacked:
    every perturbation in the ball `||Δ_l|| ≤ ε_l` keeps a certified example correct
    (`keras_wssi.analysis.certified_accuracy_curve`). Models outside the certificate's class (residual
    blocks, unsupported layers) get a note naming the layer instead of a curve.

    Args:
        report: a `Report` with `name` added.
        model, images, labels: the classifier (logits) and its evaluation data (the first `max_examples` are
            certified).
        epsilons: the radii; norm, relative, mode: as `keras_wssi.analysis.certified_margins`.

    Returns:
        The curve dict (`accuracy` = certified accuracy), or None when the model is not covered.

    Example:

    ```python
    add_certified_weight_curve(report, "mlp", model, x_test, y_test, [0, 0.001, 0.01])
    ```
    """
    images, labels = np.asarray(images)[:max_examples], np.asarray(labels)[:max_examples]
    try:
        curve = certified_accuracy_curve(model, images, labels, epsilons, norm=norm, relative=relative, mode=mode)
    except structure.StructureError as error:
        report.add_note(name, f"weights/certified skipped: {error}")
        return None
    curve = dict(curve, accuracy=curve["certified_accuracy"])
    report.add_curve(name, "weights/certified", curve)
    return curve
