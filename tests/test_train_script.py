"""examples/train.py end to end on real MNIST, its outputs, and its refusal of bad flags."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_wssi as kw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "examples", "train.py")


def run_script(*args, timeout=900):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO_ROOT
    )


@pytest.mark.slow
def test_mnist_mlp_with_weissi_reaches_98_percent_and_writes_every_output(data_dir, tmp_path):
    output_dir = str(tmp_path / "run")
    result = run_script(
        f"--data_dir={data_dir}", f"--output_dir={output_dir}", "--epochs=4", "--lr_schedule=cosine",
        "--penalties=weissi:1e-2", "--verbose=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["test_accuracy"] >= 0.98, metrics
    assert metrics["dataset"] == "mnist" and metrics["penalty_values"]["weissi"] > 0
    assert np.isclose(metrics["generalization_gap_accuracy"], metrics["train_accuracy"] - metrics["test_accuracy"])
    # The measured input gradient respects the bound chain the theory gives.
    assert metrics["input_gradient_norm_max"] <= metrics["input_gradient_bound_spectral"] <= metrics["input_gradient_bound_frobenius"]
    assert sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) == [f"epoch{e:03d}.weights.h5" for e in (1, 2, 3, 4)]
    assert any(files for _, _, files in os.walk(os.path.join(output_dir, "logs")))
    assert not [f for f in os.listdir(output_dir) if ".tmp-" in f], "no temporary files left behind"
    model = keras.models.load_model(os.path.join(output_dir, "model.keras"))
    assert [p.name for p in model.penalties] == ["weissi"]
    images, labels = kw.data.load_arrays("mnist", "test", data_dir=data_dir)
    accuracy = np.mean(np.argmax(model.predict(images, verbose=0), -1) == labels)
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, message",
    [
        ("--penalties=bogus:1", "--penalties entry 'bogus:1'"),
        ("--penalties=weissi:-1", "strength must be a finite non-negative"),
        ("--epochs=0", "--epochs must be >= 1"),
        ("--learning_rate=-0.1", "--learning_rate must be > 0"),
        ("--model=vgg", "--model"),
        ("--hidden_units=10,x", "--hidden_units must be positive integers"),
    ],
)
def test_bad_flags_are_refused_with_a_clear_message(flag, message, data_dir, tmp_path):
    result = run_script(f"--data_dir={data_dir}", f"--output_dir={tmp_path}", flag, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


@pytest.mark.slow
def test_missing_data_dir_is_refused(tmp_path):
    result = run_script(f"--data_dir={tmp_path / 'missing'}", f"--output_dir={tmp_path}", timeout=300)
    assert result.returncode != 0
    assert "is not a directory" in result.stderr
