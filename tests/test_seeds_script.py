"""examples/seeds.py end to end on real MNIST: K seeds per configuration, intervals, Welch tests, distinct seeds."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_wssi import evaluation
from keras_wssi.evaluation import statistics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "examples", "seeds.py"), *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, data_dir):
    output_dir = str(tmp_path_factory.mktemp("seeds"))
    args = [f"--data_dir={data_dir}", "--datasets=mnist", "--configs=none:,wd:l2:1e-3", "--seeds=2", "--epochs=1",
            "--train_examples=1000", "--hidden_units=32", "--eval_examples=100", "--pgd_steps=5",
            "--jacobian_examples=50", f"--output_dir={output_dir}", "--train_jit_compile=false"]
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, args, result


def test_intervals_and_tests_are_computed_from_the_seeds(seeds_run):
    output_dir, _, result = seeds_run
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    assert results["interval"] == "student_t" and results["seeds"] == 2
    table = results["datasets"]["mnist"]["table"]
    for name in ("none", "wd"):
        accuracy = table[name]["summary"]["test_accuracy"]
        # The values are the runs' own metrics.json numbers, and the interval is recomputed from them.
        on_disk = []
        for seed in range(2):
            with open(os.path.join(output_dir, "mnist", name, f"seed{seed}", "metrics.json"), encoding="utf-8") as f:
                on_disk.append(json.load(f)["test_accuracy"])
        assert accuracy["values"] == pytest.approx(on_disk)
        assert accuracy["half_width"] == pytest.approx(statistics.confidence_interval(on_disk)["half_width"])
        assert set(table[name]["summary"]) >= {"fgsm_accuracy", "pgd_accuracy", "jacobian_spectral_norm_mean"}
    welch = table["wd"]["welch_vs_baseline"]["test_accuracy"]
    reference = statistics.welch_test(table["wd"]["summary"]["test_accuracy"]["values"],
                                      table["none"]["summary"]["test_accuracy"]["values"])
    assert welch["p_value"] == pytest.approx(reference["p_value"])
    assert "±" in result.stdout and "Welch" in result.stdout and "Seeds differ" in result.stdout


def test_seeds_really_differ(seeds_run):
    output_dir, _, _ = seeds_run
    models = [evaluation.load_model(os.path.join(output_dir, "mnist", "none", f"seed{s}", "model.keras"))[0]
              for s in range(2)]
    first, second = (np.concatenate([np.ravel(w) for w in m.get_weights()]) for m in models)
    assert np.abs(first - second).max() > 1e-3
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        table = json.load(handle)["datasets"]["mnist"]["table"]
    assert table["none"]["seeds_differ"] and table["wd"]["seeds_differ"]
    # Different weights give different predictions: the seed changes results, not only bits.
    logits = [keras.ops.convert_to_numpy(m.predict(np.zeros((1, 28, 28, 1), np.float32), verbose=0)) for m in models]
    assert not np.allclose(logits[0], logits[1])


def test_rerun_reuses_runs_and_evaluations(seeds_run):
    output_dir, args, first = seeds_run
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Reusing") == 4
    assert "Trained" not in result.stderr
    # Cached evaluations: the second run reports exactly the same table.
    assert result.stdout == first.stdout
    with open(os.path.join(output_dir, "results.md"), encoding="utf-8") as handle:
        assert handle.read() + "\n" == result.stdout


def test_bad_configs_are_named(tmp_path):
    result = _run(["--configs=none:,bad:no_such_penalty:1", f"--output_dir={tmp_path}", "--datasets=mnist"])
    assert result.returncode != 0 and "--configs entry 'bad:no_such_penalty:1'" in result.stderr


def test_evaluate_cli_writes_robustbench_fields_and_diagnostics(seeds_run, data_dir, tmp_path):
    output_dir, _, _ = seeds_run
    models = [os.path.join(output_dir, "mnist", name, "seed0", "model.keras") for name in ("none", "wd")]
    report_dir = str(tmp_path / "report")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "examples", "evaluate.py"), f"--models={','.join(models)}",
         "--names=none,wd", f"--data_dir={data_dir}", f"--output_dir={report_dir}", "--num_examples=100",
         "--train_examples=0", "--attacks=fgsm,pgd", "--pgd_steps=5", "--epsilons=0,0.1", "--noise=",
         "--jacobian_examples=0", "--progress=false", "--diagnostics", "--diagnostics_examples=60", "--diagnostics_strong_steps=10",
         "--diagnostics_square_examples=30", "--square_max_iter=50"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    for name in ("none", "wd"):
        fields = report["robustbench"][name]
        entry = report["models"][name]
        assert fields["dataset"] == "mnist" and fields["threat_model"] == "Linf" and fields["eps"] == 0.1
        assert fields["clean_acc"] == entry["metrics"]["clean"]["accuracy"]
        by_family = {a["family"]: a for a in fields["attacks"]}
        pgd = entry["curves"]["attack/pgd"]
        assert by_family["attack/pgd"]["accuracy"] == pgd["accuracy"][1]
        assert by_family["attack/pgd"]["display_name"] == "PGD-5 L∞"
        assert by_family["attack/pgd"]["forward_passes"] == 100 * (5 + 1)
        assert by_family["attack/fgsm"]["display_name"] == "FGSM"
        # Robust accuracy: no higher than any attack's accuracy at ε, and equal to one of them.
        accuracies = [a["accuracy"] for a in fields["attacks"]]
        assert fields["robust_acc"] == min(accuracies)
        assert fields["forward_passes"] >= 100 * 6 + 100 * 2
        diagnostics = entry["diagnostics"]
        assert diagnostics["examples"] == 60 and len(diagnostics["checks"]) == 5
        assert fields["gradient_masking"]["passed"] == diagnostics["passed"]
        transfer = {c["check"]: c for c in diagnostics["checks"]}["transfer_not_stronger"]
        assert (transfer["passed"] is None) == (name == "none")  # 'none' is the surrogate, not its own
    summary = open(os.path.join(report_dir, "summary.md"), encoding="utf-8").read()
    assert "## RobustBench-style summary (L∞, ε=0.1)" in summary and "## Gradient-masking checks" in summary
    assert "## attack/pgd: PGD-5 L∞" in summary


def test_masking_table_counts_seeds_per_check():
    sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))
    import seeds_tables as seeds  # The tables without seeds.py's flags (train.py's may be defined already).

    def run(accuracy, fingerprint, transfer_passed):
        checks = [{"check": "unbounded_epsilon", "passed": True},
                  {"check": "transfer_not_stronger", "passed": transfer_passed}]
        return {"metrics": {"test_accuracy": accuracy}, "weights_sha256": fingerprint,
                "diagnostics": {"summary": "…", "checks": checks}}

    runs = {"none": [run(0.90, "a", None), run(0.91, "b", None)],
            "cure": [run(0.95, "c", True), run(0.96, "c", False)]}
    table = seeds.aggregate([("none", []), ("cure", ["cure:1"])], runs, "none", 0.95)
    assert table["cure"]["masking_checks"]["transfer_not_stronger"] == {"passed": 1, "ran": 2}
    assert table["none"]["masking_checks"]["transfer_not_stronger"] == {"passed": 0, "ran": 0}
    assert table["none"]["seeds_differ"] and not table["cure"]["seeds_differ"]
    text = seeds.markdown({"seeds": 2, "confidence": 0.95, "datasets": {"mnist": {"baseline": "none", "table": table}}})
    assert "| cure | 2/2 | 1/2 | **flagged** |" in text and "| none | 2/2 | skipped | passes |" in text
    assert "Seeds differ (distinct weights in every configuration): **NO**" in text
    assert "0.9550 ± 0.0635" in text  # mean ± t_{0.975,1} · s/√2 = 12.706 · 0.00707 / 1.414
