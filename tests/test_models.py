"""The training loop: closed-form updates, XLA parity, Keras features kept, serialization, wrapping, errors."""

import os

import keras
import numpy as np
import pytest

import keras_wssi as kw
from _testing import BACKEND
from _testing import compiled_count
from keras_wssi.penalties import WEISSI
from keras_wssi.penalties import WeightDecay

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    return kw.Model(inputs, keras.layers.Dense(3, name="linear")(inputs))


def _data(n=16, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, classes, n).astype("int32")


def test_sgd_step_equals_closed_form_with_penalty_and_sample_weight():
    """One SGD step on a linear softmax model: w ← w − lr ∇(weighted CE + λ·Σw²) with ∇ written out in NumPy."""
    x, y = _data()
    weights = np.random.default_rng(1).random(len(x)).astype("float32")
    model = _linear_model()
    kernel, bias = (v.numpy().astype(np.float64) for v in model.get_layer("linear").weights)
    lr, lam = 0.1, 0.05
    model.compile(keras.optimizers.SGD(lr), CE, regularizers=[WeightDecay(lam)], jit_compile=False)
    model.train_on_batch(x, y, sample_weight=weights)

    logits = x.astype(np.float64) @ kernel + bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    residual = probabilities - np.eye(3)[y]
    # Keras's default reduction "sum_over_batch_size": Σ w_i ℓ_i / N.
    scale = (weights / len(x))[:, None]
    grad_kernel = x.T.astype(np.float64) @ (scale * residual) + 2 * lam * kernel
    grad_bias = (scale * residual).sum(0)
    np.testing.assert_allclose(model.get_layer("linear").kernel.numpy(), kernel - lr * grad_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_layer("linear").bias.numpy(), bias - lr * grad_bias, rtol=1e-5, atol=1e-6)


def _train_steps(jit_compile, penalties, architecture="mlp", steps=3):
    keras.utils.set_random_seed(7)
    if architecture == "mlp":
        model = kw.architectures.mlp(input_shape=(8, 8, 1), hidden_units=(32, 16))
    else:
        model = kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(4, 8), dense_units=16)
    model.compile(keras.optimizers.SGD(0.05), CE, regularizers=penalties, jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, 32)
    history = model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return model.get_weights(), history.history


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_jit_compile_true_and_false_give_the_same_steps(architecture):
    penalties = lambda: [WEISSI(1e-2), WEISSI(1e-2, norm="spectral", name="spectral"), WeightDecay(1e-3)]  # noqa: E731
    with_xla, history_xla = _train_steps(True, penalties(), architecture)
    without_xla, history_plain = _train_steps(False, penalties(), architecture)
    for a, b in zip(with_xla, without_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in ("loss", "weissi", "spectral", "l2"):
        np.testing.assert_allclose(history_xla[key], history_plain[key], rtol=1e-4)


def test_no_retrace_per_step():
    model = kw.architectures.mlp(input_shape=(4, 4, 1), hidden_units=(8,))
    model.compile("sgd", CE, regularizers=["weissi", "l2"], jit_compile=True)
    x = np.random.rand(64, 4, 4, 1).astype("float32")
    y = np.random.randint(0, 10, 64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # The compiled function behind the train step (tf.function / jax.jit): count its programs after more epochs.
    traces = compiled_count(model.train_function)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert compiled_count(model.train_function) == traces <= 2


def test_history_logs_loss_metrics_and_each_penalty():
    x, y = _data(64, 5, 3)
    model = _linear_model()
    model.compile(
        "adam", CE, metrics=["accuracy"], regularizers=["weissi:1e-2", ("l2", 1e-3)], jit_compile=True
    )
    history = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=16, verbose=0).history
    assert {"loss", "accuracy", "weissi", "l2", "val_loss", "val_weissi", "val_l2"} <= set(history)
    assert history["loss"][-1] > 0.0
    kernel = model.get_layer("linear").kernel.numpy()
    # Evaluate logs the penalty values at the end of training: compare with NumPy.
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(results["l2"], np.sum(kernel.astype(np.float64) ** 2), rtol=1e-5)
    np.testing.assert_allclose(results["weissi"], np.log(np.linalg.norm(kernel)), rtol=1e-5)
    ce = float(CE(y, model.predict(x, verbose=0)))
    np.testing.assert_allclose(results["loss"], ce + 1e-2 * results["weissi"] + 1e-3 * results["l2"], rtol=1e-4)


def test_layer_regularizers_in_model_losses_are_added():
    x, y = _data()
    inputs = keras.Input((5,))
    layer = keras.layers.Dense(3, kernel_regularizer=kw.regularizers.LpDecay(0.5, p=2))
    model = kw.Model(inputs, layer(inputs))
    model.compile("sgd", CE, regularizers=[WEISSI(0.1)])
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    kernel = layer.kernel.numpy().astype(np.float64)
    expected = float(CE(y, model.predict(x, verbose=0))) + 0.5 * np.sum(kernel**2) + 0.1 * np.log(np.linalg.norm(kernel))
    np.testing.assert_allclose(results["loss"], expected, rtol=1e-5)


def test_regularize_evaluation_false_skips_penalties_in_evaluate():
    x, y = _data()
    model = _linear_model()
    model.compile("sgd", CE, regularizers=["weissi"], regularize_evaluation=False)
    history = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0).history
    assert "weissi" in history
    np.testing.assert_allclose(history["val_loss"][0], float(CE(y, model.predict(x, verbose=0))), rtol=1e-5)


def test_save_and_load_round_trips_model_and_penalties(tmp_path):
    x, y = _data()
    model = _linear_model()
    penalties = [WEISSI(1e-3, form="product", norm="spectral", power_iterations=2), WeightDecay(1e-4, p=1.5, name="decay")]
    model.compile("adam", CE, metrics=["accuracy"], regularizers=penalties)
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kw.Model)
    assert [p.get_config() for p in loaded.penalties] == [p.get_config() for p in penalties]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    history = loaded.fit(x, y, epochs=1, verbose=0).history
    assert {"loss", "weissi_product", "decay"} <= set(history)


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_wrap_shares_weights_and_serializes(kind, tmp_path):
    x, y = _data()
    if kind == "sequential":
        inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    elif kind == "functional":
        inputs = keras.Input((5,))
        inner = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(4, activation="relu")(inputs)))
    else:
        inner = SubclassedNet()
        inner(x[:1])
    wrapped = kw.wrap(inner)
    wrapped.compile(keras.optimizers.SGD(0.1), CE, regularizers=["weissi:0.1"])
    before = [w.numpy().copy() for w in inner.weights]
    wrapped.fit(x, y, epochs=1, verbose=0)
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, inner.weights)), "wrapping must share weights"
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), inner.predict(x, verbose=0), rtol=1e-6)
    path = os.path.join(tmp_path, f"{kind}.keras")
    wrapped.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), wrapped.predict(x, verbose=0), rtol=1e-6)
    assert [p.name for p in loaded.penalties] == ["weissi"]


@keras.saving.register_keras_serializable(package="keras_wssi_tests")
class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


@pytest.mark.parametrize("jit_compile", [True, False])
def test_subclassing_keras_wssi_model_works(jit_compile):
    @keras.saving.register_keras_serializable(package="keras_wssi_tests")
    class MyModel(kw.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, inputs):
            return self.dense(inputs)

    x, y = _data()
    model = MyModel()
    # Unbuilt until the first traced step: penalties (including stateful spectral ones) build lazily there.
    model.compile(
        "sgd", CE, regularizers=["weissi", "l1:1e-4", WEISSI(name="spectral", norm="spectral")], jit_compile=jit_compile
    )
    # Four epochs: the power iteration (one round per step) must converge from each backend's own random start.
    history = model.fit(x, y, epochs=4, verbose=0).history
    assert {"weissi", "l1", "spectral"} <= set(history)
    np.testing.assert_allclose(
        history["spectral"][-1], np.log(np.linalg.norm(model.dense.kernel.numpy(), 2)), rtol=0.05
    )


@pytest.mark.parametrize(
    "regularizers, error, match",
    [
        (["no_such_penalty"], ValueError, "Unknown penalty"),
        (["weissi:-1"], ValueError, "strength"),
        (["weissi:abc"], ValueError, "must be a number"),
        ([WEISSI(), WEISSI()], ValueError, "unique"),
        ([WEISSI(name="loss")], ValueError, "loss"),
        ([42], TypeError, "Cannot interpret"),
    ],
)
def test_bad_regularizers_raise_clear_errors(regularizers, error, match):
    with pytest.raises(error, match=match):
        _linear_model().compile("sgd", CE, regularizers=regularizers)


def test_wrap_rejects_non_models():
    with pytest.raises(TypeError, match="keras.Model"):
        kw.wrap(keras.layers.Dense(3))


def test_mixed_precision_loss_scaling_gives_finite_close_updates():
    x, y = _data()
    results = {}
    for policy in ("float32", "mixed_float16"):
        keras.config.set_dtype_policy(policy)
        try:
            model = _linear_model()
            model.compile(keras.optimizers.SGD(0.1), CE, regularizers=[WEISSI(0.1), WeightDecay(0.01)])
            model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
            results[policy] = model.get_layer("linear").kernel.numpy().astype(np.float32)
            if policy == "mixed_float16":
                assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        finally:
            keras.config.set_dtype_policy("float32")
    assert np.all(np.isfinite(results["mixed_float16"]))
    np.testing.assert_allclose(results["mixed_float16"], results["float32"], atol=5e-3)


def test_penalty_context_vjp_and_jvp_match_the_full_jacobian():
    """The Jacobian products the loop offers penalties, against the brute-force Jacobian."""
    model = kw.architectures.mlp(input_shape=(3, 3, 1), hidden_units=(7,), num_classes=4)
    x = np.random.default_rng(0).random((5, 3, 3, 1)).astype(np.float32)
    cotangent = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    tangent = np.random.default_rng(2).normal(size=(5, 3, 3, 1)).astype(np.float32)
    x_tensor, logits, input_jacobian = kw.backend.forward_with_input_jacobian(model, x, True)
    context = kw.penalties.PenaltyContext(model, x_tensor, None, None, logits, True, input_jacobian=input_jacobian)
    vjp, jvp = np.asarray(context.vjp(cotangent)), np.asarray(context.jvp(tangent))
    # The brute-force Jacobian, by each backend's own full-Jacobian routine (not the products under test).
    if BACKEND == "jax":
        import jax

        full = jax.jacrev(lambda inputs: model(inputs, training=True))(x)  # (batch, C, batch, 3, 3, 1)
        jacobian = np.stack([np.asarray(full[b, :, b]).reshape(4, -1) for b in range(5)])
    else:
        import tensorflow as tf

        inputs = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(inputs)
            outputs = model(inputs, training=True)
            columns = [outputs[:, c] for c in range(4)]
        jacobian = np.stack([tf.reshape(tape.gradient(column, inputs), [5, -1]).numpy() for column in columns], axis=1)
    np.testing.assert_allclose(vjp.reshape(5, -1), np.einsum("bc,bcd->bd", cotangent, jacobian), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jvp, np.einsum("bcd,bd->bc", jacobian, tangent.reshape(5, -1)), rtol=1e-5, atol=1e-6)
