"""End to end: a .keras model written by examples/train.py is evaluated by examples/evaluate.py."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env_extra=None, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    output_dir = str(tmp_path_factory.mktemp("train") / "run")
    result = _run([
        os.path.join(REPO_ROOT, "examples", "train.py"), f"--data_dir={data_dir}", f"--output_dir={output_dir}",
        "--hidden_units=32", "--epochs=1", "--train_examples=1000", "--test_examples=200", "--jacobian_examples=16",
        "--penalties=weissi:1e-4", "--verbose=0",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(output_dir, "model.keras"))
    return output_dir


@pytest.mark.slow
def test_training_script_model_evaluates_end_to_end(trained_run, data_dir, tmp_path):
    report_dir = str(tmp_path / "report")
    # The data folder comes from $KERAS_WSSI_DATA_DIR here (no --data_dir), as offline users set it.
    result = _run(
        [
            os.path.join(REPO_ROOT, "examples", "evaluate.py"), f"--models={trained_run}/model.keras",
            f"--output_dir={report_dir}", "--num_examples=100", "--train_examples=100", "--attacks=fgsm,pgd",
            "--pgd_steps=5", "--epsilons=0,0.1", "--noise_levels=0,0.3", "--jacobian_examples=8", "--progress=false",
        ],
        env_extra={"KERAS_WSSI_DATA_DIR": data_dir},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    (name,) = report["models"]
    entry = report["models"][name]
    assert report["settings"]["dataset"] == "mnist"
    assert entry["source"].endswith("model.keras")
    # The training script's metrics.json is carried into the report.
    assert "test_accuracy" in entry["metrics"]["training_script"]
    clean = entry["metrics"]["clean"]["accuracy"]
    for family in ("attack/fgsm", "attack/pgd", "noise/gaussian", "noise/uniform"):
        assert entry["curves"][family]["accuracy"][0] == pytest.approx(clean)
    assert entry["curves"]["attack/pgd"]["accuracy"][1] <= clean
    assert os.path.isfile(os.path.join(report_dir, "summary.md"))
    assert os.path.isfile(os.path.join(report_dir, "accuracy_vs_epsilon.png"))


@pytest.mark.slow
def test_cli_errors_are_clear(trained_run, data_dir):
    script = os.path.join(REPO_ROOT, "examples", "evaluate.py")
    result = _run([script, f"--models={trained_run}/model.keras", f"--data_dir={data_dir}", "--attacks=deepfool"])
    assert result.returncode != 0
    assert "unknown attack 'deepfool'" in result.stderr


def test_missing_model_file_is_named():
    from keras_wssi import evaluation

    with pytest.raises(evaluation.EvaluationError, match="No model at '/nonexistent/model.keras'"):
        evaluation.load_model("/nonexistent/model.keras")
    with pytest.raises(evaluation.EvaluationError, match="must be a .keras file"):
        evaluation.load_model("/nonexistent/model.h5")
