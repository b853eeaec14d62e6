"""Backups that survive corruption and refuse other runs; nothing non-finite written; labels checked under XLA.

In-process and small: a 4-6-3 dense model on synthetic data through `keras_wssi.data.EpochShuffledPipeline`.
The references are uninterrupted runs of the same code (resumption must end exactly where they end).
"""

import os

import keras
import numpy as np
import pytest

import keras_wssi as kw
from _testing import BACKEND

RNG = np.random.default_rng(0)
X = RNG.normal(size=(96, 4)).astype("float32")
Y = RNG.integers(0, 3, 96).astype("int32")
CONFIG = {"penalties": ["weissi:0.1"], "seed": 0}


def _model(penalties=("weissi:0.1",), jit_compile=False, optimizer="adam"):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="relu")(inputs)
    model = kw.Model(inputs, keras.layers.Dense(3)(hidden))
    optimizer = keras.optimizers.Adam(0.01) if optimizer == "adam" else keras.optimizers.SGD(0.1)
    model.compile(
        optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=list(penalties),
        jit_compile=jit_compile,
    )
    return model


def _fit(backup_dir, epochs, config=CONFIG, on_mismatch="raise", penalties=("weissi:0.1",)):
    model = _model(penalties)
    pipeline = kw.data.EpochShuffledPipeline(X, Y, batch_size=32, seed=3)
    backup = kw.callbacks.ResumableBackup(backup_dir, config=config, on_mismatch=on_mismatch)
    model.fit(pipeline.dataset, epochs=epochs, verbose=0, callbacks=[kw.callbacks.SetPipelineEpoch(pipeline), backup])
    return model, backup


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Three uninterrupted epochs, and the weights after each (ckpt-1, ckpt-2 are kept on disk)."""
    model, _ = _fit(str(tmp_path_factory.mktemp("reference") / "backup"), epochs=3)
    return model.get_weights()


def _two_epochs(tmp_path):
    backup_dir = str(tmp_path / "backup")
    _fit(backup_dir, epochs=2)
    assert sorted(n for n in os.listdir(backup_dir) if n.endswith(".index")) == ["ckpt-1.index", "ckpt-2.index"]
    return backup_dir


def _assert_weights_equal(expected, model):
    for a, b in zip(expected, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_resume_continues_to_the_uninterrupted_weights(tmp_path, reference):
    backup_dir = _two_epochs(tmp_path)
    model, backup = _fit(backup_dir, epochs=3)
    assert backup.restored_epoch == 2
    _assert_weights_equal(reference, model)
    assert os.path.isdir(backup_dir), "fit returning does not delete the backup; delete() does"
    # The resumed manager keeps counting: the two newest backups remain.
    assert sorted(n for n in os.listdir(backup_dir) if n.endswith(".index")) == ["ckpt-2.index", "ckpt-3.index"]
    backup.delete()
    assert not os.path.exists(backup_dir)


@pytest.mark.parametrize("pointer", ["model_checkpoint_path: \"ckpt-9\"\n", "", "model_checkpoint_path: \"../x\"\n", "\x00garbage{"])
def test_a_bad_pointer_file_neither_deletes_nor_hides_the_backups(pointer, tmp_path, reference):
    backup_dir = _two_epochs(tmp_path)
    with open(os.path.join(backup_dir, "checkpoint"), "w") as handle:
        handle.write(pointer)
    model, backup = _fit(backup_dir, epochs=3)
    assert backup.restored_epoch == 2
    assert any("pointer file" in m for m in backup.messages), backup.messages
    _assert_weights_equal(reference, model)


@pytest.mark.parametrize("damage", ["truncate_data", "delete_index_of_data", "empty_data", "flip_a_byte"])
def test_a_corrupt_newest_backup_falls_back_to_the_previous_one_saying_so(damage, tmp_path, reference):
    backup_dir = _two_epochs(tmp_path)
    data_file = next(os.path.join(backup_dir, n) for n in os.listdir(backup_dir) if n.startswith("ckpt-2.data"))
    if damage == "truncate_data":
        size = os.path.getsize(data_file)
        with open(data_file, "r+b") as handle:
            handle.truncate(size // 2)
    elif damage == "empty_data":
        open(data_file, "w").close()
    elif damage == "flip_a_byte":  # Same size, one weight's bits changed: only a checksum sees it.
        with open(data_file, "r+b") as handle:
            handle.seek(20)
            byte = handle.read(1)
            handle.seek(20)
            handle.write(bytes([byte[0] ^ 0x40]))
    else:
        os.remove(data_file)
    model, backup = _fit(backup_dir, epochs=3)
    assert backup.restored_epoch == 1, backup.messages
    assert any("ckpt-2 is unreadable" in m and "falling back to ckpt-1" in m for m in backup.messages), backup.messages
    _assert_weights_equal(reference, model)  # Epochs 2 and 3 are redone from epoch 1's state.


def test_a_backup_of_another_configuration_is_refused_or_resumed_on_request(tmp_path):
    backup_dir = _two_epochs(tmp_path)
    other = {"penalties": ["l2:1e-4"], "seed": 0}
    with pytest.raises(kw.callbacks.BackupMismatchError, match=r"penalties: backup \['weissi:0.1'\], this run \['l2:1e-4'\]"):
        _fit(backup_dir, epochs=3, config=other, penalties=("l2:1e-4",))
    assert sorted(n for n in os.listdir(backup_dir) if n.endswith(".index")) == ["ckpt-1.index", "ckpt-2.index"]
    _, backup = _fit(backup_dir, epochs=3, config=other, on_mismatch="resume", penalties=("l2:1e-4",))
    assert backup.restored_epoch == 2 and any("Resuming it anyway" in m for m in backup.messages)


def test_a_backup_in_the_other_backends_format_is_refused_and_kept(tmp_path):
    # TensorFlow writes tf.train checkpoint bundles, JAX JSON-indexed arrays (tf.train cannot save JAX arrays):
    # a backup of the other format is named, never read as damaged and deleted.
    backup_dir = _two_epochs(tmp_path)
    index = os.path.join(backup_dir, "ckpt-3.index")
    with open(index, "wb") as handle:
        handle.write(b"\x00\x01tf-bundle" if BACKEND == "jax" else b'{"format": "keras_wssi.array_backup.v1"}')
    other = "tensorflow" if BACKEND == "jax" else "jax"
    with pytest.raises(kw.callbacks.BackupMismatchError, match=rf"ckpt-3 was written on the {other} backend.*KERAS_BACKEND={other}"):
        _fit(backup_dir, epochs=4)
    assert os.path.exists(index)


def test_stateful_penalty_state_is_in_the_backup(tmp_path):
    model = _model(("jacobian_spectral_norm:0.01",))
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    names = [getattr(v, "path", v.name) for v in kw.callbacks.training_state_variables(model)]
    assert any("jacobian_spectral_norm" in n for n in names), names
    assert any("iteration" in n for n in names), "the optimizer's step counter is part of the state"


# ---------------------------------------------------------------------------------------------------------
# Nothing non-finite is written, and the cause is named.


def _guarded_fit(model, x, y, tmp_path, validation_data=None, epochs=2):
    callbacks = [
        kw.callbacks.TerminateOnNonFinite(),
        kw.callbacks.AtomicWeightsCheckpoint(str(tmp_path / "checkpoints" / "e{epoch}.weights.h5")),
        kw.callbacks.ResumableBackup(str(tmp_path / "backup")),
    ]
    os.makedirs(tmp_path / "checkpoints", exist_ok=True)
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, validation_data=validation_data, callbacks=callbacks)


def _written(tmp_path):
    checkpoints = os.listdir(tmp_path / "checkpoints")
    backups = [n for n in os.listdir(tmp_path / "backup") if n.startswith("ckpt-")] if os.path.isdir(tmp_path / "backup") else []
    return sorted(checkpoints), sorted(backups)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_nan_pixel_stops_at_its_batch_and_blames_the_data_term(jit_compile, tmp_path):
    x = X[:64].copy()
    x[37, 1] = np.nan  # Batch 3 of 4 (batch size 16).
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 3: the data term"):
        _guarded_fit(_model(jit_compile=jit_compile), x, Y[:64], tmp_path)
    assert _written(tmp_path) == ([], []), "no checkpoint or backup of non-finite weights may be written"


@pytest.mark.parametrize(
    "strength, optimizer, message",
    [
        # Finite loss (~1e31): Adam's second moment g² overflows to Inf while the weights stay finite.
        (1e30, "adam", r"penalty 'weissi': strength 1e\+30 × value .* dominates the loss"),
        # SGD takes the step (weights ~1e29, still finite); the next value of the penalty is Inf.
        (1e30, "sgd", r"epoch 1, batch 2: penalty 'weissi' is inf \(strength 1e\+30\)"),
        # strength × value is Inf in float32 at the first step.
        (1e308, "adam", r"penalty 'weissi': strength 1e\+308 × value .* overflows float32"),
    ],
)
def test_a_huge_strength_is_blamed_on_the_penalty_and_nothing_is_written(strength, optimizer, message, tmp_path):
    model = _model((kw.penalties.get("weissi").__class__(strength=strength),), optimizer=optimizer)
    with pytest.raises(FloatingPointError, match=message):
        _guarded_fit(model, X, Y, tmp_path)
    assert _written(tmp_path) == ([], [])


def test_a_nan_validation_loss_stops_before_the_epoch_is_saved(tmp_path):
    # A NaN pixel can vanish in the forward pass (oneDNN's ReLU maps NaN to 0), a NaN sample weight cannot.
    weights = np.ones(32, "float32")
    weights[5] = np.nan
    with pytest.raises(FloatingPointError, match=r"epoch 1 \(validation\): val_loss = nan.*validation data"):
        _guarded_fit(_model(), X, Y, tmp_path, validation_data=(X[:32], Y[:32], weights))
    assert _written(tmp_path) == ([], [])


def test_check_finite_state_refuses_non_finite_weights(tmp_path):
    model = _model()
    weights = model.get_weights()
    weights[0][0, 0] = np.inf
    model.set_weights(weights)
    with pytest.raises(FloatingPointError, match=r"Refusing to write m.keras: 1 variable\(s\) hold NaN/Inf"):
        kw.callbacks.check_finite_state(model, "m.keras")


def test_a_diverging_penalty_value_is_named():
    class Exploding(kw.penalties.Penalty):
        default_name = "exploding"

        def call(self, context):
            return keras.ops.log(keras.ops.zeros(()) * context.logits[0, 0])  # log 0 = -inf

    model = _model((Exploding(1.0),))
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 1: penalty 'exploding' is -inf \(strength 1\)"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[kw.callbacks.TerminateOnNonFinite()])


# ---------------------------------------------------------------------------------------------------------
# Labels.


def test_out_of_range_labels_are_refused_once_per_fit_also_under_xla():
    y = Y.copy()
    y[10] = 3  # The model has 3 classes: 0, 1, 2.
    unchecked = _model(jit_compile=True)
    history = unchecked.fit(X, y, batch_size=32, epochs=1, verbose=0)
    if BACKEND == "tensorflow":
        assert not np.isfinite(history.history["loss"][-1]), "without the check XLA trains into NaN silently"
    else:
        # JAX's one-hot of an out-of-range label is all zeros: the example silently scores loss 0 instead.
        assert np.isfinite(history.history["loss"][-1]), "without the check JAX trains on, silently"
    model = _model(jit_compile=True)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"1 label\(s\) fall outside \[0, 3\).*label 3 at index 10"):
        model.fit(X, y, batch_size=32, epochs=1, verbose=0, callbacks=[kw.callbacks.CheckLabels(y)])
    _assert_weights_equal(before, model)  # Refused before the first step.
    dataset = kw.data.EpochShuffledPipeline(X, y, batch_size=32).dataset
    with pytest.raises(ValueError, match="fall outside"):
        model.fit(dataset, epochs=1, verbose=0, callbacks=[kw.callbacks.CheckLabels(dataset)])
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[kw.callbacks.CheckLabels(Y)])


def test_epoch_order_depends_only_on_seed_and_epoch():
    images = np.arange(40, dtype=np.float32).reshape(10, 2, 2, 1)
    labels = np.arange(10, dtype=np.int32)
    first = kw.data.EpochShuffledPipeline(images, labels, batch_size=4, seed=5)
    second = kw.data.EpochShuffledPipeline(images, labels, batch_size=4, seed=5)
    assert int(first.dataset.cardinality()) == first.num_batches == 3
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
