"""examples/train.py end to end on real MNIST, its outputs, its quiet healthy output, and its fast clear failures."""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_wssi as kw
from _testing import BACKEND

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "examples", "train.py")
sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))
import train as train_script  # noqa: E402  (only its flag lists and ALARMING are read)


def run_script(*args, timeout=900, env_extra=None, drop=()):
    # As a user runs it: no TF_CPP_MIN_LOG_LEVEL preset, so the script's own silencing is what is tested.
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", *drop)}
    environment.update(env_extra or {})
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO_ROOT
    )


@pytest.mark.slow
def test_mnist_mlp_with_weissi_reaches_98_percent_and_writes_every_output(data_dir, tmp_path):
    output_dir = str(tmp_path / "run")
    result = run_script(
        f"--data_dir={data_dir}", f"--output_dir={output_dir}", "--epochs=4", "--lr_schedule=cosine",
        "--penalties=weissi:1e-2", "--progress=epoch"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A healthy run is quiet: no device-probe noise, no N/Unknown progress, no "input ran out of data".
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if any(word in line for word in train_script.ALARMING)], output[-3000:]
    assert f"outputs go to {os.path.abspath(output_dir)}" in result.stdout
    assert f"Keras backend {BACKEND}" in result.stdout
    if BACKEND == "jax":
        assert "XLA on (auto): the JAX backend compiles every step" in result.stdout
    else:
        assert "XLA on (auto): dense-only model" in result.stdout
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
    assert kw.data.read_description(os.path.join(output_dir, "model.keras")) == kw.data.describe("mnist")
    assert not os.path.exists(os.path.join(output_dir, "backup")), "deleted once every output is written"
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
def test_bad_flags_are_refused_first_in_a_few_lines_and_create_nothing(flag, message, data_dir, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script(f"--data_dir={data_dir}", f"--output_dir={output_dir}", flag, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("train.py: error:") and message in result.stderr and len(lines) <= 3, result.stderr
    assert not output_dir.exists()


def test_help_exits_zero_before_importing_tensorflow():
    start = time.time()
    result = run_script("--help", timeout=120)
    assert result.returncode == 0 and "--penalties" in result.stdout and "--resume_anyway" in result.stdout
    assert time.time() - start < 20, "--help must not wait for TensorFlow"


def test_flag_choices_match_the_library():
    assert set(train_script.DATASETS) == set(kw.data.SUPPORTED_DATASETS)
    assert set(train_script.MODELS) == set(kw.architectures.ARCHITECTURES)


def test_xla_rule():
    rule = train_script.resolve_jit_compile
    assert rule("auto", "mlp", False, [])[0] is True
    assert rule("auto", "cnn", False, [])[0] is False and rule("auto", "resnet", False, [])[0] is False
    assert rule("auto", "cnn", False, ["GPU"])[0] is True
    assert rule("auto", "mlp", True, [])[0] is False and rule("true", "mlp", True, [])[0] is False
    assert rule("true", "cnn", False, [])[0] is True and rule("false", "mlp", False, [])[0] is False
    # On JAX every step is compiled with XLA (uncompiled, Keras runs it op by op), deterministic on CPU.
    for model in ("mlp", "cnn", "resnet"):
        for deterministic in (False, True):
            assert rule("auto", model, deterministic, [], backend="jax")[0] is True
    assert rule("false", "cnn", False, [], backend="jax")[0] is False and rule("true", "mlp", True, [], backend="jax")[0] is True


@pytest.mark.slow
def test_missing_data_dir_is_refused(tmp_path):
    result = run_script(f"--data_dir={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'run'}", timeout=300)
    assert result.returncode == 2
    assert "is not a directory" in result.stderr and not (tmp_path / "run").exists()


def test_offline_without_data_dir_fails_within_seconds_naming_the_files(tmp_path):
    start = time.time()
    result = run_script(
        f"--output_dir={tmp_path / 'run'}", "--dataset=fashion_mnist", timeout=300,
        env_extra={"KERAS_WSSI_OFFLINE": "1", "TFDS_DATA_DIR": str(tmp_path / "tfds")}, drop=("KERAS_WSSI_DATA_DIR",),
    )
    seconds = time.time() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train-images-idx3-ubyte.gz" in result.stderr and "--data_dir" in result.stderr
    assert "unreachable" in result.stderr and not (tmp_path / "run").exists()
    assert seconds < 90, f"{seconds:.0f} s (tensorflow-datasets alone retries for ~200 s)"


def test_evaluate_reads_the_data_set_from_the_model_and_refuses_to_guess(tmp_path):
    model = kw.architectures.mlp(input_shape=(28, 28, 1), hidden_units=(8,))
    path = str(tmp_path / "bare" / "model.keras")
    os.makedirs(os.path.dirname(path))
    model.save(path)
    evaluate = os.path.join(REPO_ROOT, "examples", "evaluate.py")
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, evaluate, f"--models={path}", f"--output_dir={tmp_path / 'report'}"],
        capture_output=True, text=True, timeout=300, env=environment, cwd=REPO_ROOT,
    )
    assert result.returncode != 0 and "not record its data set" in result.stderr, result.stderr[-2000:]
    kw.data.write_description(path, kw.data.describe("fashion_mnist"))
    result = subprocess.run(
        [sys.executable, evaluate, f"--models={path}", "--dataset=mnist", f"--output_dir={tmp_path / 'report'}"],
        capture_output=True, text=True, timeout=300, env=environment, cwd=REPO_ROOT,
    )
    assert result.returncode != 0 and "trained on another" in result.stderr and "(fashion_mnist)" in result.stderr


def test_a_diverging_run_names_the_penalty_and_writes_nothing_non_finite(data_dir, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script(
        f"--data_dir={data_dir}", f"--output_dir={output_dir}", "--penalties=weissi:1e30", "--train_examples=512",
        "--test_examples=64", "--hidden_units=16", "--epochs=2", "--progress=none", timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "epoch 1, batch 1: penalty 'weissi': strength 1e+30" in result.stderr, result.stderr[-2000:]
    assert os.listdir(output_dir / "checkpoints") == []
    assert not (output_dir / "model.keras").exists() and not (output_dir / "metrics.json").exists()
    backup = output_dir / "backup"
    assert not backup.exists() or not [n for n in os.listdir(backup) if n.startswith("ckpt-")]
