r"""Trains and evaluates penalties × K seeds, and reports every metric as mean ± a confidence interval.

One command per results table. For every data set, configuration and seed it runs examples/train.py (same
flags, `--seed=k`), then evaluates the model (clean accuracy, generalization gap and mean σ_max(J) from the
training script's metrics.json; FGSM and PGD accuracy at --epsilon on the first --eval_examples test images, with
attack random starts seeded by k; optionally the gradient-masking checks of
keras_wssi/evaluation/diagnostics.py, with the first configuration's model of the same seed as the
unregularized surrogate). It then prints and writes, per data set:

- a table of `mean ± half-width` of the 95% Student-t confidence interval over seeds (`--confidence`);
- Welch's t-test of every configuration against the first one (`--baseline`), per metric: the difference and
  its two-sided p-value;
- a check that the seeds really differ (each run's weights fingerprint is distinct).

    python examples/seeds.py --data_dir=../shared/data                      # the defaults below, 3 seeds
    python examples/seeds.py --data_dir=../shared/data --datasets=mnist --seeds=5 \
        --configs=none:,input_gradient:input_gradient:0.5 --diagnostics

A configuration is `name:penalties`, penalties as examples/train.py's --penalties (`;`-separated for several,
empty for none). Runs go to `--output_dir/<dataset>/<name>/seed<k>`; a run whose model.keras and metrics.json
exist is reused (rerun the command to resume), and so is its evaluation when its settings did not change.
Writes `results.json` and `results.md` (`--results_name`) into --output_dir.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

import keras_wssi as kw  # noqa: E402
from keras_wssi import evaluation  # noqa: E402
from keras_wssi.evaluation import diagnostics as diagnostics_module  # noqa: E402
from keras_wssi.evaluation import statistics  # noqa: E402
from seeds_tables import aggregate  # noqa: E402
from seeds_tables import markdown  # noqa: E402

DEFAULT_CONFIGS = [
    "none:",
    "weight_decay:l2:1e-4",
    "weissi:weissi:1e-2",
    "input_gradient:input_gradient:0.5",
    "jacobian_frobenius:jacobian_frobenius:0.05",
    "jacobian_spectral_norm:jacobian_spectral_norm:0.01",
    "cure:cure:1.0",
    "cross_lipschitz:cross_lipschitz:0.05",
]

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Data sets.")
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or tensorflow-datasets.")
flags.DEFINE_list("configs", DEFAULT_CONFIGS, "Configurations name:penalties (penalties ';'-separated, may be empty).")
flags.DEFINE_string("baseline", "", "Configuration the others are tested against (default: the first).")
flags.DEFINE_integer("seeds", 3, "Seeds per configuration (0 … K−1).")
flags.DEFINE_integer("epochs", 2, "Training epochs.")
flags.DEFINE_integer("train_examples", 10000, "Training examples (the first N; 0: all 60,000).")
flags.DEFINE_list("hidden_units", ["256", "256"], "Hidden widths of the MLP.")
flags.DEFINE_integer("jacobian_examples", 500, "Test examples for mean σ_max(J) (train.py --jacobian_examples).")
flags.DEFINE_string("model", "mlp", "Architecture (examples/train.py --model).")
flags.DEFINE_integer("eval_examples", 1000, "Test images for the attacks (the first N).")
flags.DEFINE_float("epsilon", 0.1, "L∞ ε of FGSM, PGD and the diagnostics.")
flags.DEFINE_integer("pgd_steps", 20, "PGD iterations (random start).")
flags.DEFINE_boolean("diagnostics", False, "Also run the gradient-masking checks on every model.")
flags.DEFINE_integer("diagnostics_examples", 500, "Test images for the gradient-masking checks.")
flags.DEFINE_integer("square_examples", 200, "Images for the Square attack of the checks.")
flags.DEFINE_integer("square_queries", 300, "Square queries per image.")
flags.DEFINE_integer("strong_steps", 100, "PGD steps of the 'more steps and restarts' check.")
flags.DEFINE_integer("strong_restarts", 2, "Restarts of the 'more steps and restarts' check.")
flags.DEFINE_float("confidence", statistics.DEFAULT_CONFIDENCE, "Coverage of the Student-t intervals.")
flags.DEFINE_string("output_dir", "runs/seeds", "Where the runs and the results files go.")
flags.DEFINE_string("results_name", "results", "Results files: <output_dir>/<results_name>.json and .md.")
flags.DEFINE_boolean("train_jit_compile", True, "XLA for training (examples/train.py --jit_compile).")

for _name in ("seeds", "epochs", "eval_examples", "pgd_steps"):
    flags.register_validator(_name, lambda value: value >= 1, message=f"--{_name} must be >= 1.")
flags.register_validator("seeds", lambda value: value >= 2, message="--seeds must be >= 2 for an interval.")

# metric key → (column title, format); the order of the tables.


def parse_configs(specs):
    """`["none:", "wd:l2:1e-4"]` → `[("none", []), ("wd", ["l2:1e-4"])]`; raises `app.UsageError` on a bad entry."""
    configs = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        name, separator, penalties = spec.partition(":")
        if not separator or not name:
            raise app.UsageError(f"--configs entry {spec!r}: expected name:penalties, e.g. 'wd:l2:1e-4' or 'none:'.")
        penalty_specs = [p.strip() for p in penalties.split(";") if p.strip()]
        for penalty in penalty_specs:
            try:
                kw.penalties.get(penalty)
            except (ValueError, TypeError) as error:
                raise app.UsageError(f"--configs entry {spec!r}: {error}") from None
        configs.append((name, penalty_specs))
    names = [name for name, _ in configs]
    if len(set(names)) != len(names) or not names:
        raise app.UsageError(f"--configs names must be unique and non-empty, got {names}.")
    return configs


def train_command(dataset, penalties, seed, run_dir):
    """The examples/train.py command line of one run."""
    return [
        sys.executable, os.path.join(REPO_ROOT, "examples", "train.py"), f"--dataset={dataset}",
        f"--epochs={FLAGS.epochs}", f"--train_examples={FLAGS.train_examples}", f"--model={FLAGS.model}",
        f"--hidden_units={','.join(FLAGS.hidden_units)}", f"--penalties={','.join(penalties)}", f"--seed={seed}",
        f"--output_dir={run_dir}", "--verbose=0", f"--jacobian_examples={FLAGS.jacobian_examples}",
        f"--jit_compile={str(FLAGS.train_jit_compile).lower()}",
    ] + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])


def train(dataset, penalties, seed, run_dir):
    """Trains one run unless its model.keras and metrics.json exist with the same seed and epochs."""
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(os.path.join(run_dir, "model.keras")) and os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        if metrics.get("seed") == seed and metrics.get("epochs") == FLAGS.epochs:
            logging.info("Reusing %s", run_dir)
            return metrics
    os.makedirs(run_dir, exist_ok=True)
    command = train_command(dataset, penalties, seed, run_dir)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    if result.returncode != 0:
        raise RuntimeError(f"Training failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    logging.info("Trained %s in %.0f s", run_dir, time.time() - started)
    with open(metrics_path, encoding="utf-8") as handle:
        return json.load(handle)


def weights_fingerprint(model):
    """SHA-256 of every weight's bytes: equal fingerprints mean identical models."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy(), dtype=np.float32).tobytes())
    return digest.hexdigest()


def evaluation_settings():
    return {"eval_examples": FLAGS.eval_examples, "epsilon": FLAGS.epsilon, "pgd_steps": FLAGS.pgd_steps,
            "diagnostics": FLAGS.diagnostics, "diagnostics_examples": FLAGS.diagnostics_examples,
            "square_examples": FLAGS.square_examples, "square_queries": FLAGS.square_queries,
            "strong_steps": FLAGS.strong_steps, "strong_restarts": FLAGS.strong_restarts}


def diagnostic_metrics(checks):
    """Per-run numbers from the gradient-masking checks: each attack's accuracy and the fraction of checks passed."""
    metrics = {"white_box_accuracy": checks["white_box_accuracy"]}
    large = checks["checks"][[c["check"] for c in checks["checks"]].index("unbounded_epsilon")]
    for attack in checks["attacks"]:
        if attack["name"].startswith("Square"):
            metrics["square_accuracy"] = attack["accuracy"]
        elif "transferred" in attack["name"]:
            metrics["transfer_accuracy"] = attack["accuracy"]
        elif "restarts" in attack["name"]:
            metrics["strong_pgd_accuracy"] = attack["accuracy"]
        elif attack["epsilon"] == large["large_epsilon"]:
            metrics["large_epsilon_accuracy"] = attack["accuracy"]
    ran = [c for c in checks["checks"] if c["passed"] is not None]
    metrics["masking_checks_passed"] = sum(bool(c["passed"]) for c in ran) / len(ran)
    return metrics


def evaluate_run(run_dir, seed, images, labels, surrogate_dir):
    """The run's metrics: from metrics.json plus FGSM/PGD (and the masking checks); cached in evaluation.json."""
    cache = os.path.join(run_dir, "evaluation.json")
    settings = evaluation_settings()
    if os.path.isfile(cache):
        with open(cache, encoding="utf-8") as handle:
            cached = json.load(handle)
        if cached.get("settings") == settings and cached.get("surrogate") == surrogate_dir:
            if "diagnostics" in cached:
                cached["metrics"].update(diagnostic_metrics(cached["diagnostics"]))
            return cached
    model, training = evaluation.load_model(os.path.join(run_dir, "model.keras"))
    metrics = {
        "test_accuracy": training["test_accuracy"],
        "generalization_gap_accuracy": training["generalization_gap_accuracy"],
        "jacobian_spectral_norm_mean": training["input_gradient_norm_mean"],
    }
    x, y = images[: FLAGS.eval_examples], labels[: FLAGS.eval_examples]
    for key, attack in (("fgsm_accuracy", evaluation.get_attack("fgsm")),
                        ("pgd_accuracy", evaluation.get_attack("pgd", nb_iter=FLAGS.pgd_steps))):
        runner = evaluation.AttackRunner(model, attack, batch_size=500, seed=seed, progress=False)
        metrics[key] = runner.robust_accuracy(x, y, [FLAGS.epsilon])["accuracy"][0]
    result = {"settings": settings, "surrogate": surrogate_dir, "metrics": metrics,
              "weights_sha256": weights_fingerprint(model)}
    if FLAGS.diagnostics:
        surrogate = None
        if surrogate_dir and os.path.abspath(surrogate_dir) != os.path.abspath(run_dir):
            surrogate, _ = evaluation.load_model(os.path.join(surrogate_dir, "model.keras"))
        n = FLAGS.diagnostics_examples
        checks = diagnostics_module.gradient_masking_checks(
            model, images[:n], labels[:n], epsilon=FLAGS.epsilon, steps=FLAGS.pgd_steps,
            strong_steps=FLAGS.strong_steps, strong_restarts=FLAGS.strong_restarts,
            square_queries=FLAGS.square_queries, square_examples=FLAGS.square_examples, surrogate=surrogate,
            surrogate_name=os.path.basename(os.path.dirname(surrogate_dir or "")) or "surrogate", seed=seed,
            batch_size=500)
        metrics.update(diagnostic_metrics(checks))
        result["diagnostics"] = checks
    with open(cache, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, allow_nan=False)
    return result


def run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    configs = parse_configs(FLAGS.configs)
    baseline = FLAGS.baseline or configs[0][0]
    if baseline not in dict(configs):
        raise app.UsageError(f"--baseline {baseline!r} is not one of the configurations {[n for n, _ in configs]}.")
    for dataset in FLAGS.datasets:
        if dataset not in kw.data.SUPPORTED_DATASETS:
            raise app.UsageError(f"--datasets: unknown {dataset!r}; expected {', '.join(kw.data.SUPPORTED_DATASETS)}.")
    results = {"seeds": FLAGS.seeds, "confidence": FLAGS.confidence, "interval": "student_t", "test": "welch",
               "command": " ".join(["python", "examples/seeds.py"] + sys.argv[1:]),
               "training": {"epochs": FLAGS.epochs, "train_examples": FLAGS.train_examples, "model": FLAGS.model,
                            "hidden_units": FLAGS.hidden_units},
               "evaluation": evaluation_settings(), "configs": dict(configs), "datasets": {}}
    for dataset in FLAGS.datasets:
        images, labels = kw.data.load_arrays(dataset, "test", data_dir=FLAGS.data_dir)
        runs = {name: [] for name, _ in configs}
        for seed in range(FLAGS.seeds):
            for name, penalties in configs:
                train(dataset, penalties, seed, os.path.join(FLAGS.output_dir, dataset, name, f"seed{seed}"))
        for seed in range(FLAGS.seeds):
            surrogate_dir = os.path.join(FLAGS.output_dir, dataset, baseline, f"seed{seed}")
            for name, _ in configs:
                run_dir = os.path.join(FLAGS.output_dir, dataset, name, f"seed{seed}")
                logging.info("Evaluating %s", run_dir)
                runs[name].append(evaluate_run(run_dir, seed, images, labels, surrogate_dir))
        results["datasets"][dataset] = {"baseline": baseline,
                                        "table": aggregate(configs, runs, baseline, FLAGS.confidence)}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, FLAGS.results_name + ".json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, allow_nan=False)
    text = markdown(results)
    with open(os.path.join(FLAGS.output_dir, FLAGS.results_name + ".md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return results


def main(argv):
    try:
        run(argv)
    except (evaluation.EvaluationError, kw.data.DataError, RuntimeError) as error:
        raise app.UsageError(str(error)) from error


if __name__ == "__main__":
    app.run(main)
