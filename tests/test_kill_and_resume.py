"""examples/train.py killed with SIGKILL at named points, rerun each time, ends bit-identical to an uninterrupted run.

The kills are deterministic: `$KERAS_WSSI_CRASH_AT=<point>[:k]` makes the process SIGKILL itself the k-th time
it reaches `keras_wssi.callbacks.crash_point(<point>)` (no sleeps, no races). One output folder goes through a
chain of kills — each rerun of the same command resumes from what the previous one left — and its final
`model.keras`, per-epoch checkpoints and metrics must equal those of an uninterrupted `--deterministic` run.
"""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_wssi  # noqa: F401  (registers the classes model.keras refers to)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "examples", "train.py")
SETTINGS = [
    "--train_examples=512", "--test_examples=128", "--jacobian_examples=8", "--hidden_units=16", "--epochs=3",
    "--batch_size=128", "--deterministic", "--progress=none",
]

# Where each kill lands with 4 batches per epoch and 3 epochs (a point's k-th visit is counted per process):
CHAINS = {
    # Stateless penalties: every kind of point.
    "weissi:1e-2,l2:1e-5": [
        "train_batch:6",               # mid-epoch 2 (backup of epoch 1 on disk)
        "backup_written",              # epoch 2's backup files written, the pointer not yet updated
        "weights_checkpoint_written",  # epoch 3's weights in a temporary file, not yet renamed
        "after_fit",                   # after the last epoch, before metrics and saving (Keras's backup is gone here)
        "model_written",               # during the final save: model.keras written under a temporary name
        "outputs_written",             # model.keras and metrics.json written, the backup not yet deleted
    ],
    # A stateful penalty (warm-start vectors and power-iteration state live in variables).
    "jacobian_spectral_norm:1e-2": ["train_batch:3", "backup_written:2", "model_written"],
}


def _run(data_dir, output_dir, penalties, crash=None, extra=()):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # On JAX every rerun would compile the same steps again: one persistent XLA cache per chain (beside the
    # output folders) lets reruns load them. The compiled programs are the same, so the results are too.
    environment.update(
        JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(output_dir), "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    environment.pop("KERAS_WSSI_CRASH_AT", None)
    if crash:
        environment["KERAS_WSSI_CRASH_AT"] = crash
    command = [sys.executable, SCRIPT, f"--data_dir={data_dir}", f"--output_dir={output_dir}", f"--penalties={penalties}"]
    return subprocess.run(command + SETTINGS + list(extra), capture_output=True, text=True, env=environment, timeout=600)


def _weights(path):
    return keras.models.load_model(path).get_weights()


def _assert_same_run(reference_dir, resumed_dir):
    for a, b in zip(_weights(os.path.join(reference_dir, "model.keras")), _weights(os.path.join(resumed_dir, "model.keras"))):
        np.testing.assert_array_equal(a, b)
    names = sorted(os.listdir(os.path.join(reference_dir, "checkpoints")))
    assert names == sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == [f"epoch00{e}.weights.h5" for e in (1, 2, 3)]
    with open(os.path.join(reference_dir, "metrics.json")) as handle:
        expected = json.load(handle)
    with open(os.path.join(resumed_dir, "metrics.json")) as handle:
        got = json.load(handle)
    for key in ("test_accuracy", "test_loss", "train_loss", "penalty_values", "input_gradient_norm_max"):
        assert got[key] == expected[key], key
    assert not os.path.exists(os.path.join(resumed_dir, "backup")), "the backup is deleted once every output is written"
    assert not [f for _, _, files in os.walk(resumed_dir) for f in files if ".tmp" in f or "_temp" in f]


@pytest.mark.slow
@pytest.mark.parametrize("penalties", list(CHAINS), ids=["stateless", "stateful_spectral_warm_start"])
def test_killed_anywhere_and_rerun_ends_bit_identical(penalties, data_dir, tmp_path):
    reference_dir, resumed_dir = str(tmp_path / "reference"), str(tmp_path / "resumed")
    reference = _run(data_dir, reference_dir, penalties)
    assert reference.returncode == 0, reference.stderr[-3000:]

    for index, point in enumerate(CHAINS[penalties]):
        killed = _run(data_dir, resumed_dir, penalties, crash=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        if index == 0 and penalties.startswith("weissi"):
            # Another configuration on the same folder is refused, and says how to go on; nothing is touched.
            other = _run(data_dir, resumed_dir, "l2:1e-4")
            assert other.returncode == 2, other.stderr[-3000:]
            assert "different configuration" in other.stderr and "penalties: backup" in other.stderr
            assert "--fresh" in other.stderr and "--resume_anyway" in other.stderr
    final = _run(data_dir, resumed_dir, penalties)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_run(reference_dir, resumed_dir)

    if not penalties.startswith("weissi"):
        again = _run(data_dir, resumed_dir, penalties)  # A finished run is not trained again.
        assert again.returncode == 0 and "already holds this run's finished outputs" in again.stdout
