"""examples/evaluate.py runs the ensemble (--autoattack) and the compiled attacks' ε-curves (--attacks=apgd_ce,…)
on a saved model, and records what `keras_wssi.evaluation.autoattack` returns."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_wssi import architectures
from keras_wssi import data
from keras_wssi import evaluation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_script_runs_the_ensemble(tmp_path, data_dir):
    keras.utils.set_random_seed(0)
    x_train, y_train = data.load_arrays("mnist", "train", data_dir)
    model = architectures.mlp(hidden_units=(32,))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:1000], y_train[:1000], epochs=1, batch_size=128, verbose=0)
    model_path = str(tmp_path / "mlp" / "model.keras")
    os.makedirs(os.path.dirname(model_path))
    model.save(model_path)
    report_dir = str(tmp_path / "report")
    args = [
        os.path.join(REPO_ROOT, "examples", "evaluate.py"), f"--models={model_path}", f"--data_dir={data_dir}",
        f"--output_dir={report_dir}", "--num_examples=60", "--train_examples=0", "--jacobian_examples=0",
        "--noise=", "--attacks=apgd_ce,square_compiled", "--apgd_steps=5", "--square_queries=20", "--epsilons=0,0.1",
        "--autoattack=fast", "--autoattack_epsilon=0.1", "--autoattack_square_queries=30", "--autoattack_targets=2",
        "--progress=false", "--dataset=mnist", "--diagnostics_epsilon=0.1", "--diagnostics_strong_steps=5",
        "--diagnostics_square_examples=20",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as handle:
        content = json.load(handle)
    entry = content["models"]["mlp"]
    recorded = entry["metrics"]["autoattack"]
    assert [a["name"] for a in recorded["attacks"]] == ["apgd_ce", "apgd_t", "square_compiled"]
    assert recorded["attacks"][1]["settings"]["n_targets"] == 2
    assert recorded["attacks"][2]["settings"]["nb_iter"] == 30
    # The script's numbers are the library's on the same examples and settings.
    x_test, y_test = data.load_arrays("mnist", "test", data_dir)
    direct = evaluation.autoattack(
        keras.models.load_model(model_path), np.array(x_test[:60]), np.array(y_test[:60]), 0.1, version="fast",
        batch_size=500, budget={"apgd_ce": {"nb_iter": 5}, "apgd_t": {"nb_iter": 5, "n_targets": 2},
                                "square_compiled": {"nb_iter": 30}},
    )
    assert recorded["robust_accuracy"] == pytest.approx(direct["robust_accuracy"])
    # The RobustBench-style fields carry the ensemble's number, and the masking checks ran the ensemble too.
    assert content["robustbench"]["mlp"]["ensemble_acc"] == pytest.approx(recorded["robust_accuracy"])
    assert "AutoAttack" in json.dumps(entry["diagnostics"])
    assert recorded["clean_accuracy"] == pytest.approx(entry["metrics"]["clean"]["accuracy"])
    curve = entry["curves"]["attack/apgd_ce"]
    assert curve["accuracy"][0] == pytest.approx(recorded["clean_accuracy"])
    assert curve["settings"]["library"] == "keras_wssi"
    assert entry["curves"]["attack/square_compiled"]["settings"]["nb_iter"] == 20
