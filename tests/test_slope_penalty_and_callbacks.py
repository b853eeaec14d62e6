"""The slope penalty, the slope-logging callback and early stopping on the slope."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wssi as kw
from _testing import BACKEND
from _testing import jitted_functions
from _testing import tf_functions
from keras_wssi import penalties as P
from keras_wssi.analysis import slope

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# On JAX `jit_compile=False` runs the step op by op (keras_wssi.xla recommends XLA there for every model); that
# path is trained and checked by tests/test_resume_and_nonfinite.py, and here the cases run compiled only on
# JAX, which keeps this file's JAX run as fast as its TensorFlow run.
JIT_COMPILE = [False, True] if BACKEND == "tensorflow" else [True]


def tiny_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return kw.architectures.mlp(input_shape=(4, 4, 1), hidden_units=(10, 8), num_classes=4)


def tiny_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return kw.architectures.small_cnn(input_shape=(6, 6, 1), filters=(3,), dense_units=6, num_classes=4)


def data(shape=(4, 4, 1), n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 4, n).astype("int32")


def assert_traced_once(model, jit_compile):
    """The train step was traced (compiled) once: a `tf.function` with one concrete function, or a `jax.jit`
    with one cache entry (an uncompiled JAX step is not traced at all)."""
    if BACKEND == "tensorflow":
        functions = tf_functions(model.train_function)
        assert functions and all(len(f._list_all_concrete_functions()) == 1 for f in functions)
    elif jit_compile:
        functions = jitted_functions(model.train_function)
        assert functions and all(f._cache_size() == 1 for f in functions)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_exact_penalty_value_is_the_mean_slope_power(power, jit_compile):
    model = tiny_mlp()
    x, y = data()
    model.compile("sgd", LOSS, regularizers=[P.SlopePenalty(1.0, power=power)], jit_compile=jit_compile)
    logs = model.test_on_batch(x, y, return_dict=True)
    assert model.penalties[0].requires == frozenset({"weights", "inputs"})  # exact: no input tape
    assert logs["slope"] == pytest.approx(np.mean(slope(model, x) ** power), rel=1e-4)


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_power_iteration_penalty_on_a_cnn(jit_compile):
    model = tiny_cnn()
    x, y = data((6, 6, 1))
    penalty = P.SlopePenalty(1.0, method="auto", iterations=8)
    model.compile("sgd", LOSS, regularizers=[penalty], jit_compile=jit_compile)
    logs = model.test_on_batch(x, y, return_dict=True)
    assert "input_jacobian" in penalty.requires
    assert logs["slope"] == pytest.approx(np.mean(slope(model, x) ** 2), rel=2e-2)
    assert logs["slope"] <= np.mean(slope(model, x) ** 2) * (1 + 1e-4)  # power iteration is a lower estimate


def test_exact_penalty_gradient_matches_autodiff_through_the_svd():
    model = tiny_mlp()
    x, y = data()
    penalty = P.SlopePenalty(1.0, power=2)
    penalty.build(model)
    variables = model.trainable_variables

    def penalty_of(*weights):  # The code under test, on the active backend, as a function of the weights.
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            inputs = keras.ops.convert_to_tensor(x)
            context = kw.penalties.PenaltyContext(model, inputs, keras.ops.convert_to_tensor(y), None, model(inputs), True)
            return penalty(context)

    weights = [keras.ops.convert_to_tensor(v) for v in variables]
    value = penalty_of(*weights)
    gradients = kw.backend.grad(penalty_of, *weights)
    # The reference: TF eager ops on the same weights as numpy arrays (the MLP written out: flatten, ReLU dense
    # layers, linear logits), the Jacobian row by row with nested tapes and σ_max from its SVD.
    reference_weights = [tf.Variable(np.asarray(keras.ops.convert_to_numpy(v))) for v in variables]

    def reference_logits(point):
        h = tf.reshape(point, [tf.shape(point)[0], -1])
        for index in range(0, len(reference_weights), 2):
            h = h @ reference_weights[index] + reference_weights[index + 1]
            h = tf.nn.relu(h) if index + 2 < len(reference_weights) else h
        return h

    with tf.GradientTape() as tape:
        jacobians = []
        for example in x:
            point = tf.constant(example[None])
            with tf.GradientTape(persistent=True) as inner:
                inner.watch(point)
                logits = reference_logits(point)
                rows = [logits[0, c] for c in range(4)]
            jacobians.append(tf.stack([tf.reshape(inner.gradient(r, point), [-1]) for r in rows]))
        sigma = tf.linalg.svd(tf.stack(jacobians), compute_uv=False)[:, 0]
        reference = tf.reduce_mean(sigma**2)
    expected = tape.gradient(reference, reference_weights)
    assert float(value) == pytest.approx(float(reference), rel=1e-4)
    for variable, got, want in zip(variables, gradients, expected):
        # Biases only move the ReLU masks: zero gradient (None or zeros on one side or both).
        got = np.zeros(variable.shape) if got is None else np.asarray(keras.ops.convert_to_numpy(got))
        want = np.zeros(variable.shape) if want is None else want.numpy()
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)
    assert np.abs(keras.ops.convert_to_numpy(gradients[0])).max() > 1e-3


@pytest.mark.parametrize("factory", [tiny_mlp, tiny_cnn], ids=["mlp_exact", "cnn_power_iteration"])
@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_trains_lowers_slope_and_does_not_retrace(factory, jit_compile):
    model = factory()
    shape = (4, 4, 1) if factory is tiny_mlp else (6, 6, 1)
    x, y = data(shape, n=32)
    before = slope(model, x).mean()
    model.compile(keras.optimizers.SGD(0.05), LOSS, regularizers=[P.SlopePenalty(1.0)], jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["slope"]))
    assert slope(model, x).mean() < before
    assert_traced_once(model, jit_compile)


def test_config_and_keras_round_trip(tmp_path):
    penalty = P.SlopePenalty(0.3, power=1, method="power_iteration", iterations=4, name="slope_l1")
    assert P.SlopePenalty.from_config(penalty.get_config()).get_config() == penalty.get_config()
    assert isinstance(P.get("slope:0.1"), P.SlopePenalty)
    model = tiny_mlp()
    x, y = data()
    model.compile("sgd", LOSS, regularizers=[penalty, P.SlopePenalty(0.1)])
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "slope.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [p.get_config() for p in loaded.penalties] == [p.get_config() for p in model.penalties]
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    got = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert got["slope"] == pytest.approx(expected["slope"], rel=1e-5)


def test_bad_penalty_arguments():
    with pytest.raises(ValueError, match="power"):
        P.SlopePenalty(power=3)
    with pytest.raises(ValueError, match="method"):
        P.SlopePenalty(method="svd")
    with pytest.raises(ValueError, match="iterations"):
        P.SlopePenalty(iterations=0)
    model = tiny_cnn()
    with pytest.raises(kw.structure.StructureError):
        model.compile("sgd", LOSS, regularizers=[P.SlopePenalty(method="exact")])
        model.train_on_batch(*data((6, 6, 1)))


def test_slope_logger_writes_history_and_tensorboard(tmp_path):
    model = tiny_mlp()
    x, y = data(n=32)
    model.compile(keras.optimizers.SGD(0.05), LOSS)
    logger = kw.callbacks.SlopeLogger(x[:20], log_dir=str(tmp_path))
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[logger])
    for key in ("slope_mean", "slope_median", "slope_q10", "slope_q90"):
        assert len(history.history[key]) == 2
    assert history.history["slope_median"][-1] == pytest.approx(np.median(slope(model, x[:20])), rel=1e-5)
    assert sorted(logger.values) == [0, 1]
    events = glob.glob(os.path.join(str(tmp_path), "slope", "events.out.tfevents.*"))
    assert events
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
            tags.add(value.tag)
    assert "slope" in tags and "slope_median" in tags


def test_early_stopping_plateau_and_threshold():
    x, y = data(n=16)
    frozen = tiny_mlp()
    frozen.compile(keras.optimizers.SGD(0.0), LOSS)  # nothing changes: the slope is flat from epoch 2 on
    stop = kw.callbacks.SlopeEarlyStopping(x, criterion="plateau", min_delta=1e-3, patience=2)
    history = frozen.fit(x, y, epochs=10, verbose=0, callbacks=[stop])
    assert len(history.history["loss"]) == 3 and stop.stopped_epoch == 2

    model = tiny_mlp()
    initial = [w.copy() for w in model.get_weights()]
    model.compile(keras.optimizers.SGD(0.5), LOSS)
    budget = float(np.median(slope(model, x))) * 1.0001
    stop = kw.callbacks.SlopeEarlyStopping(x, criterion="threshold", threshold=budget, restore_weights=True)
    history = model.fit(x, y, epochs=10, verbose=0, callbacks=[stop])
    assert stop.stopped_epoch is not None and len(history.history["loss"]) < 10
    assert history.history["slope_median"][-1] > budget
    if stop.stopped_epoch == 0:
        for got, want in zip(model.get_weights(), initial):
            np.testing.assert_array_equal(got, want)
    assert np.median(slope(model, x)) <= budget


def test_callback_arguments():
    x = np.zeros((4, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="every"):
        kw.callbacks.SlopeLogger(x, every=0)
    with pytest.raises(ValueError, match="floating"):
        kw.callbacks.SlopeLogger(np.zeros((4, 3), np.int32))
    with pytest.raises(ValueError, match="threshold"):
        kw.callbacks.SlopeEarlyStopping(x, criterion="threshold")
    with pytest.raises(ValueError, match="criterion"):
        kw.callbacks.SlopeEarlyStopping(x, criterion="loss")
    with pytest.raises(ValueError, match="statistic"):
        kw.callbacks.SlopeEarlyStopping(x, statistic="max")


def test_a_strength_set_by_a_callback_reaches_the_next_step():
    # On JAX the step's state lives outside the variables during an epoch; a callback that goes through
    # `self.model` (which writes the state back) and assigns the strength must still change the next step's loss.
    class Squares(kw.penalties.Penalty):
        default_name = "squares"

        def call(self, context):
            return keras.ops.mean(keras.ops.square(context.logits))

    class StrengthIsTheBatchIndex(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.penalties[0].strength = float(batch)

        def on_train_batch_end(self, batch, logs=None):
            running.append((float(logs["loss"]), float(logs["squares"])))

    x, y = data(n=8)
    x, y = np.tile(x, (4, 1, 1, 1)), np.tile(y, 4)  # Four identical batches: only the strength changes.
    model = tiny_mlp()
    model.compile(keras.optimizers.SGD(0.0), LOSS, regularizers=[Squares(0.0)], jit_compile=True)
    running = []
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[StrengthIsTheBatchIndex()])
    value = running[0][1]
    # The logged loss is the running mean of data + strength × value with strengths 0, 1, 2, 3.
    for k, (loss, _) in enumerate(running):
        assert loss - running[0][0] == pytest.approx(value * k / 2, rel=1e-4), running
    assert model.penalties[0].strength == 3.0

    warmup = kw.callbacks.PenaltyStrengthScheduler("squares", kw.callbacks.linear_warmup(1.0, 3))
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[warmup])
    assert history.history["squares_strength"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    losses = history.history["loss"]
    assert losses[2] - losses[0] == pytest.approx(value * (1.0 - 1 / 3), rel=1e-4)
    assert losses[1] - losses[0] == pytest.approx(value * (1 / 3), rel=1e-4)
