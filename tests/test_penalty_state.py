"""Penalty state is model state: saved, restored in a fresh process, resumed bit for bit; strength is a variable.

The continuation runs in a new Python process (`tests/penalty_state_continue.py`), so nothing survives in memory:
whatever the resumed run needs must have been in the file.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_wssi as kw
from _testing import BACKEND
from _testing import compiled_count

HERE = os.path.dirname(os.path.abspath(__file__))
PENALTY_NAMES = sorted(kw.penalties.registered_penalties())
STEPS, MORE_STEPS = 2, 2
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batches(seed, count=STEPS + MORE_STEPS, size=16):
    generator = np.random.default_rng(seed)
    return [
        (generator.random((size, 6, 6, 1), dtype=np.float32), generator.integers(0, 10, size))
        for _ in range(count)
    ]


def build_model(name, jit_compile=False, optimizer="adam"):
    model = kw.architectures.mlp(input_shape=(6, 6, 1), hidden_units=(16, 16))
    cls, defaults = kw.penalties.registered_penalties()[name]
    penalty = cls(**defaults) if name == "jacobian_spectral_norm_error" else cls(**{**defaults, "strength": 0.05})
    optimizer = keras.optimizers.Adam(1e-2) if optimizer == "adam" else keras.optimizers.SGD(0.05)
    model.compile(optimizer, LOSS, regularizers=[penalty], jit_compile=jit_compile)
    return model


def _by_path(variables):
    return {v.path: np.asarray(v) for v in variables}


# The stateful penalties (and one stateless one) also go through a weights checkpoint and through XLA.
STATEFUL = ("jacobian_frobenius", "jacobian_spectral_norm", "layerwise_spectral_norm", "cross_lipschitz", "l2")
# The exact slope's gradient follows the top singular vector of each example's Jacobian, which flips between
# near-equal singular values on ulp-level differences; the CPU kernels are not bit-reproducible run to run for it
# (two uninterrupted runs in one process differ too, also with oneDNN off), and Adam turns a flipped near-zero
# gradient entry into a full learning-rate step. So: SGD, and agreement to 1e-3 (the kernels move ~1e-2 in these
# four steps; seen: up to 1.3e-5) instead of bit for bit.
TOLERANCE = {"slope": 1e-3}


def _optimizer(name, kind):
    # Adam in a .keras file (its moments are saved too); SGD with a weights file (which holds no optimizer state).
    return "adam" if kind == "keras" and name not in TOLERANCE else "sgd"


def _cases():
    cases = [(name, "keras", False) for name in PENALTY_NAMES] + [(name, "weights", False) for name in STATEFUL]
    return cases + [(name, "keras", True) for name in ("jacobian_spectral_norm", "layerwise_spectral_norm")]


class _OpDeterminism:
    """TensorFlow's op determinism, on until `close()` (nothing to do on JAX, whose CPU kernels are deterministic)."""

    def __init__(self):
        self._tf = None
        if BACKEND == "tensorflow":
            import tensorflow as tf

            self._tf = tf
            tf.config.experimental.enable_op_determinism()

    def close(self):
        if self._tf is not None:
            # TensorFlow has no public switch back; its config module's is what `enable_op_determinism` calls.
            from tensorflow.python.framework import config as tf_config

            tf_config.disable_op_determinism()


@pytest.fixture(scope="module")
def resumed_in_fresh_process(tmp_path_factory):
    """Trains STEPS steps of every case here, saves it, continues MORE_STEPS steps in a new process; also runs
    the uninterrupted STEPS + MORE_STEPS steps here. Returns {case: (uninterrupted, resumed, saved_paths)}."""
    folder = tmp_path_factory.mktemp("state")
    determinism = _OpDeterminism()
    entries, expected = [], {}
    for index, (name, kind, jit_compile) in enumerate(_cases()):
        seed = 100 + index
        optimizer = _optimizer(name, kind)
        keras.utils.set_random_seed(seed)
        model = build_model(name, jit_compile=jit_compile, optimizer=optimizer)
        for x, y in batches(seed)[:STEPS]:
            model.train_on_batch(x, y)
        entry = {"penalty": name, "kind": kind, "jit_compile": jit_compile, "seed": seed, "steps_done": STEPS,
                 "result_path": str(folder / f"{index}.npz"), "keras_path": str(folder / f"{index}.keras"),
                 "weights_path": str(folder / f"{index}.weights.h5"), "saved_paths": [v.path for v in model.variables],
                 "optimizer": optimizer}
        model.save(entry["keras_path"]) if kind == "keras" else model.save_weights(entry["weights_path"])
        entries.append(entry)
        # The uninterrupted run: the same model, seed and batches, all steps in one process.
        keras.utils.set_random_seed(seed)
        reference = build_model(name, jit_compile=jit_compile, optimizer=optimizer)
        for x, y in batches(seed):
            reference.train_on_batch(x, y)
        expected[(name, kind, jit_compile)] = _by_path(reference.variables)
    determinism.close()  # Off again: Keras disables XLA under op determinism, which later tests rely on.
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"entries": entries, "repo_root": HERE, "hint_path": str(folder / "hint.txt")}))
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "penalty_state_continue.py"), str(manifest)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = {}
    for entry, case in zip(entries, _cases()):
        with np.load(entry["result_path"]) as arrays:
            resumed[case] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return expected, resumed, entries, (folder / "hint.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-{c[1]}{'-xla' if c[2] else ''}")
def test_resumed_in_a_fresh_process_equals_uninterrupted_run_bit_for_bit(resumed_in_fresh_process, case):
    expected, resumed, entries, _ = resumed_in_fresh_process
    entry = entries[_cases().index(case)]
    want = expected[case]
    got = dict(zip(entry["saved_paths"], resumed[case]))
    assert sorted(got) == sorted(want)
    # Penalty state is among the model's variables (and so in the file).
    name = case[0]
    assert any(path.startswith(f"{kw.penalties.get(name).name}/") for path in got), sorted(got)
    for path in want:
        if name in TOLERANCE:
            np.testing.assert_allclose(got[path], want[path], atol=TOLERANCE[name], err_msg=f"{case}: {path}")
        else:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{case}: {path}")


@pytest.mark.slow
def test_loading_without_import_says_to_import_keras_wssi(resumed_in_fresh_process):
    hint = resumed_in_fresh_process[3]
    assert "import keras_wssi" in hint, hint[:500]


def test_penalty_state_is_in_model_variables_and_changes_with_training():
    keras.utils.set_random_seed(3)
    model = build_model("jacobian_spectral_norm", jit_compile=True)
    paths = {v.path for v in model.variables}
    assert {"jacobian_spectral_norm/strength", "jacobian_spectral_norm/warm_start", "jacobian_spectral_norm/seed"} <= paths
    state = model.penalties[0].state
    before = _by_path(state.variables)
    x, y = batches(3)[0]
    model.evaluate(x, y, verbose=0)
    assert all(np.array_equal(before[p], v) for p, v in _by_path(state.variables).items()), "evaluate changed state"
    model.train_on_batch(x, y)
    after = _by_path(state.variables)
    assert not np.array_equal(before["jacobian_spectral_norm/warm_start"], after["jacobian_spectral_norm/warm_start"])
    # The warm start draws nothing: the random-draw counter does not move; a random-projection penalty's does.
    assert after["jacobian_spectral_norm/seed"][1] == before["jacobian_spectral_norm/seed"][1]
    frobenius = build_model("jacobian_frobenius")
    counter = int(frobenius.penalties[0].state.variables[0].numpy()[1])
    frobenius.train_on_batch(x, y)
    assert int(frobenius.penalties[0].state.variables[0].numpy()[1]) == counter + 1


def test_recompiling_replaces_the_penalty_state():
    model = build_model("layerwise_spectral_norm")
    assert any(v.path.startswith("layerwise_spectral_norm/") for v in model.variables)
    model.compile("sgd", LOSS, regularizers=["l2"])
    paths = [v.path for v in model.variables]
    assert not any(p.startswith("layerwise_spectral_norm/") for p in paths) and "l2/strength" in paths


@pytest.mark.parametrize("jit_compile", [False, True])
def test_changing_strength_changes_the_loss_by_delta_times_value_without_retracing(jit_compile):
    keras.utils.set_random_seed(5)
    model = build_model("input_gradient", jit_compile=jit_compile, optimizer="sgd")
    penalty = model.penalties[0]
    x, y = batches(5)[0]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.evaluate(x, y, verbose=0)
    traces = compiled_count(model.test_function, jit_compile)
    first = model.evaluate(x, y, verbose=0, return_dict=True)
    penalty.strength = 1000.0
    second = model.evaluate(x, y, verbose=0, return_dict=True)
    assert compiled_count(model.test_function, jit_compile) == traces, "changing strength retraced"
    value = first["input_gradient"]
    assert value > 0 and second["input_gradient"] == pytest.approx(value, rel=1e-6)
    assert second["loss"] - first["loss"] == pytest.approx((1000.0 - 0.05) * value, rel=1e-4)
    assert penalty.get_config()["strength"] == 1000.0
    # Training reads the new strength too: one SGD step moves the weights by the larger gradient.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    train_traces = compiled_count(model.train_function, jit_compile)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert compiled_count(model.train_function, jit_compile) == train_traces


def test_strength_schedule_callback_warms_up_and_is_logged():
    keras.utils.set_random_seed(6)
    model = build_model("input_gradient", optimizer="sgd")
    x = np.concatenate([b[0] for b in batches(6)])
    y = np.concatenate([b[1] for b in batches(6)])
    warmup = kw.callbacks.PenaltyStrengthScheduler("input_gradient", kw.callbacks.linear_warmup(0.5, epochs=4))
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[warmup])
    assert history.history["input_gradient_strength"] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])
    assert model.penalties[0].strength == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no penalty named 'missing'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kw.callbacks.PenaltyStrengthScheduler("missing", lambda e, s: s)])
    with pytest.raises(ValueError, match="strength"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kw.callbacks.PenaltyStrengthScheduler("input_gradient", lambda e, s: -1.0)])


def test_penalty_names_that_collide_with_metrics_are_rejected():
    model = kw.architectures.mlp(input_shape=(6, 6, 1), hidden_units=(8,))
    for name, metrics in (("accuracy", ["accuracy"]), ("val_loss", None), ("loss", None), ("auc", [keras.metrics.AUC(name="auc")])):
        with pytest.raises(ValueError, match="collide"):
            model.compile("sgd", LOSS, metrics=metrics, regularizers=[kw.penalties.WeightDecay(name=name)])
    with pytest.raises(ValueError, match="unique"):
        model.compile("sgd", LOSS, regularizers=["l2", "weight_decay"])


def test_a_penalty_built_for_one_model_is_refused_by_another():
    penalty = kw.penalties.get("layerwise_spectral_norm")
    first = kw.architectures.mlp(input_shape=(6, 6, 1), hidden_units=(8,))
    first.compile("sgd", LOSS, regularizers=[penalty])
    first.compile("sgd", LOSS, regularizers=[penalty])  # Recompiling the same model keeps the penalty.
    second = kw.architectures.mlp(input_shape=(6, 6, 1), hidden_units=(8,))
    with pytest.raises(ValueError, match="built for model"):
        second.compile("sgd", LOSS, regularizers=[penalty])


@pytest.mark.parametrize("name", ["input_gradient", "jacobian_spectral_norm", "weissi"])
def test_penalty_loss_in_a_custom_loop_equals_the_train_step(name):
    """`keras_wssi.penalty_loss` inside a hand-written step (a GradientTape on TensorFlow, `jax.value_and_grad`
    over a stateless scope on JAX, as in docs/penalties_as_state.md) gives the same update as `fit`."""
    x, y = batches(9)[0]
    keras.utils.set_random_seed(9)
    model = build_model(name, optimizer="sgd")
    model.train_on_batch(x, y)
    keras.utils.set_random_seed(9)
    custom = kw.architectures.mlp(input_shape=(6, 6, 1), hidden_units=(16, 16))
    cls, defaults = kw.penalties.registered_penalties()[name]
    penalties = [cls(**{**defaults, "strength": 0.05})]
    optimizer = keras.optimizers.SGD(0.05)
    variables = custom.trainable_variables
    if BACKEND == "jax":
        import jax

        # Build the penalties (their state) eagerly, then differentiate a stateless loss of the weights; the
        # penalties' own variables are state too (an uncompiled model does not track them).
        kw.penalty_loss(custom, penalties, x[:1], y[:1], training=False)
        state = custom.non_trainable_variables + [v for p in penalties for v in p.variables]

        def loss_fn(values, state_values):
            mapping = list(zip(variables, values)) + list(zip(state, state_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                result = kw.penalty_loss(custom, penalties, x, y)
                loss = keras.ops.mean(LOSS(y, result.y_pred)) + result.total
            return loss, (result.values, [scope.get_current_value(v) for v in state])

        (_, (values, new_state)), gradients = jax.value_and_grad(loss_fn, has_aux=True)(
            [v.value for v in variables], [v.value for v in state]
        )
        for variable, value in zip(state, new_state):
            variable.assign(value)
    else:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            result = kw.penalty_loss(custom, penalties, tf.constant(x), tf.constant(y))
            loss = tf.reduce_mean(LOSS(y, result.y_pred)) + result.total
        values, gradients = result.values, tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(gradients, variables))
    assert set(values) == {penalties[0].name}
    for a, b in zip(model.trainable_variables, custom.trainable_variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="Create them once"):
        kw.penalty_loss(custom, ["weissi"], x, y)


def test_a_file_without_penalty_state_loads_with_a_warning_and_trains(tmp_path):
    """Files written before penalties kept state (no `_keras_wssi_state` weights): each penalty starts fresh, and
    says so, instead of the load failing."""
    import io
    import zipfile

    import h5py

    keras.utils.set_random_seed(4)
    model = build_model("jacobian_spectral_norm")
    x, y = batches(4)[0]
    model.train_on_batch(x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    weights = io.BytesIO(members["model.weights.h5"])
    with h5py.File(weights, "a") as handle:
        assert "_keras_wssi_state" in handle
        del handle["_keras_wssi_state"]
    members["model.weights.h5"] = weights.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.warns(UserWarning, match="No saved state for penalty 'jacobian_spectral_norm'"):
        loaded = keras.models.load_model(path)
    assert not np.any(loaded.penalties[0]._warm_state.numpy())  # Fresh: no class seen yet.
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.train_on_batch(x, y)
    assert np.any(loaded.penalties[0]._warm_state.numpy())


def test_strength_assigned_mid_epoch_through_the_penalty_reaches_the_next_step():
    """`penalty.strength = x` from code holding the penalty (not `self.model`) mid-`fit` takes effect at the next
    step: on JAX, where `fit` keeps the variables' values in its own state during an epoch, too."""
    x = np.concatenate([b[0] for b in batches(12)])
    y = np.concatenate([b[1] for b in batches(12)])

    class RaiseAtBatch(keras.callbacks.Callback):
        def __init__(self, penalty):
            super().__init__()
            self.penalty = penalty

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                self.penalty.strength = 5.0

    keras.utils.set_random_seed(12)
    model = build_model("input_gradient", optimizer="sgd")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[RaiseAtBatch(model.penalties[0])])
    keras.utils.set_random_seed(12)
    reference = build_model("input_gradient", optimizer="sgd")
    for step in range(4):
        if step == 2:
            reference.penalties[0].strength = 5.0
        reference.train_on_batch(x[16 * step:16 * (step + 1)], y[16 * step:16 * (step + 1)])
    for a, b in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert model.penalties[0].strength == 5.0
