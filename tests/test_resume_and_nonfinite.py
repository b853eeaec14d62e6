"""Crash safety: an interrupted train.py resumes to the same weights; NaN stops training with a clear message."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import keras_wssi as kw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "examples", "train.py")


def _command(data_dir, output_dir):
    return [
        sys.executable, SCRIPT, f"--data_dir={data_dir}", f"--output_dir={output_dir}", "--deterministic",
        "--train_examples=3072", "--test_examples=500", "--jacobian_examples=20", "--hidden_units=64,32",
        "--epochs=4", "--penalties=weissi:1e-2,l2:1e-5", "--verbose=0",
    ]


def _environment():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_weights(data_dir, tmp_path):
    reference_dir, resumed_dir = str(tmp_path / "reference"), str(tmp_path / "resumed")
    reference = subprocess.run(_command(data_dir, reference_dir), capture_output=True, text=True, env=_environment())
    assert reference.returncode == 0, reference.stderr[-2000:]

    process = subprocess.Popen(_command(data_dir, resumed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment())
    pointer = os.path.join(resumed_dir, "backup", "latest")
    deadline = time.time() + 600
    while not os.path.exists(pointer) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not os.path.exists(os.path.join(resumed_dir, "model.keras"))
    with open(pointer) as handle:
        assert handle.read().startswith("state-")

    resumed = subprocess.run(_command(data_dir, resumed_dir), capture_output=True, text=True, env=_environment())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = keras.models.load_model(os.path.join(reference_dir, "model.keras")).get_weights()
    got = keras.models.load_model(os.path.join(resumed_dir, "model.keras")).get_weights()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    assert not [f for _, _, files in os.walk(resumed_dir) for f in files if ".tmp-" in f]


def test_epoch_order_depends_only_on_seed_and_epoch():
    images = np.arange(40, dtype=np.float32).reshape(10, 2, 2, 1)
    labels = np.arange(10, dtype=np.int32)
    first = kw.data.EpochShuffledPipeline(images, labels, batch_size=4, seed=5)
    second = kw.data.EpochShuffledPipeline(images, labels, batch_size=4, seed=5)
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        orders.append(np.concatenate([b[1] for b in first.dataset.as_numpy_iterator()]))
    second.set_epoch(2)  # A fresh pipeline jumping straight to epoch 2, as after a resume.
    np.testing.assert_array_equal(np.concatenate([b[1] for b in second.dataset.as_numpy_iterator()]), orders[2])
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[1], first.epoch_order(1))
    with pytest.raises(ValueError, match="NaN or Inf in 1 examples"):
        bad = images.copy()
        bad[3, 0, 0, 0] = np.nan
        kw.data.EpochShuffledPipeline(bad, labels, batch_size=4)


def _compiled_linear(penalties):
    inputs = keras.Input((4,))
    model = kw.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=penalties)
    return model


def test_nan_in_the_data_stops_training_naming_the_data_term_and_step(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    x[37, 1] = np.nan  # Batch 3 of 4 (batch size 16).
    y = np.zeros(64, "int32")
    model = _compiled_linear(["weissi:0.1"])
    checkpoint = kw.callbacks.AtomicWeightsCheckpoint(str(tmp_path / "epoch{epoch}.weights.h5"))
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 3: the loss is nan while every penalty is finite"):
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[kw.callbacks.TerminateOnNonFinite(), checkpoint])
    assert os.listdir(tmp_path) == [], "no checkpoint of non-finite weights may be written"


def test_diverging_penalty_is_named():
    class Exploding(kw.penalties.Penalty):
        default_name = "exploding"

        def call(self, context):
            return keras.ops.log(keras.ops.zeros(()) * context.logits[0, 0])  # log 0 = -inf

    model = _compiled_linear([Exploding(1.0)])
    x = np.ones((8, 4), "float32")
    with pytest.raises(FloatingPointError, match="penalty 'exploding' is -inf"):
        model.fit(x, np.zeros(8, "int32"), epochs=1, verbose=0, callbacks=[kw.callbacks.TerminateOnNonFinite()])
