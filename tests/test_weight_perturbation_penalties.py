"""The theory-driven weight-perturbation loss and SAM as penalties: values, exactness of SAM, XLA, serialization."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wssi as kw
from _testing import BACKEND
from _testing import compiled_count
from _testing import tf_functions
from keras_wssi import penalties as P
from keras_wssi.analysis import weight_perturbation as wp

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def tiny_mlp(activation="relu", seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(6, activation=activation, name="hidden")(inputs)
    return kw.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n).astype("int32")


def _hand_written_sam_step(model, x, y, rho, learning_rate):
    """Two-pass SAM (Foret et al. 2021, Alg. 1) on a copy of the weights, with plain SGD: a TensorFlow reference on
    the model's NumPy weights (the Dense-ReLU-Dense network of `tiny_mlp` written out), whatever the backend."""
    weights = [tf.Variable(np.asarray(v)) for v in model.trainable_variables]
    x, y = tf.constant(x), tf.constant(y)

    def loss_at(values):
        kernel, bias, head_kernel, head_bias = values
        logits = tf.matmul(tf.nn.relu(tf.matmul(x, kernel) + bias), head_kernel) + head_bias
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), logits))

    with tf.GradientTape() as tape:
        loss = loss_at([tf.convert_to_tensor(w) for w in weights])
    gradients = tape.gradient(loss, weights)
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in gradients]))
    perturbed = [w + rho * g / norm for w, g in zip(weights, gradients)]
    with tf.GradientTape() as tape:
        tape.watch(perturbed)
        sharp_loss = loss_at(perturbed)
    sam_gradients = tape.gradient(sharp_loss, perturbed)
    return [w.numpy() - learning_rate * g.numpy() for w, g in zip(weights, sam_gradients)], float(sharp_loss - loss)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sam_penalty_is_exactly_sam(jit_compile):
    model = tiny_mlp()
    x, y = data()
    expected_weights, expected_sharpness = _hand_written_sam_step(model, x, y, 0.3, 0.1)
    model.compile(keras.optimizers.SGD(0.1), LOSS, regularizers=[P.SharpnessAwareMinimization(1.0, rho=0.3)], jit_compile=jit_compile)
    logs = model.train_on_batch(x, y, return_dict=True)
    for value, expected in zip(model.trainable_variables, expected_weights):
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert logs["sam"] == pytest.approx(expected_sharpness, rel=1e-4, abs=1e-6)
    assert logs["sam"] > 0


def test_sam_differs_from_plain_sgd_and_is_zero_safe():
    model = tiny_mlp()
    x, y = data()
    plain = tiny_mlp()
    plain.compile(keras.optimizers.SGD(0.1), LOSS)
    plain.train_on_batch(x, y)
    model.compile(keras.optimizers.SGD(0.1), LOSS, regularizers=[P.SharpnessAwareMinimization(rho=0.3)])
    model.train_on_batch(x, y)
    assert not np.allclose(model.trainable_variables[0].numpy(), plain.trainable_variables[0].numpy())
    # All-zero weights: zero gradient of the loss w.r.t. the kernels → guarded global norm, finite step.
    zero = tiny_mlp()
    for v in zero.trainable_variables:
        v.assign(np.zeros(v.shape, "float32"))
    zero.compile(keras.optimizers.SGD(0.1), LOSS, regularizers=[P.SharpnessAwareMinimization(rho=0.3)])
    logs = zero.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and np.isfinite(logs["sam"])
    assert all(np.all(np.isfinite(v.numpy())) for v in zero.trainable_variables)


@pytest.mark.parametrize("mode", ["norm", "activation"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_weight_perturbation_loss_value(mode, jit_compile):
    model = tiny_mlp()
    x, y = data()
    penalty = P.WeightPerturbationLoss(1.0, epsilon=0.05, margin_weight=0.7, complexity_weight=0.01, mode=mode)
    model.compile(keras.optimizers.SGD(0.0), LOSS, regularizers=[penalty], jit_compile=jit_compile)
    logs = model.test_on_batch(x, y, return_dict=True)
    result = wp.certified_margins(model, x, y, 0.05, mode=mode)
    hinge = np.maximum(result["bounds"] - result["margins"], 0).max(axis=1).mean()
    product = np.prod([float(wp.operator_norm(l.kernel, "inf")) + 0.05 for l in model.layers[1:]])
    assert logs["weight_perturbation"] == pytest.approx(0.7 * hinge + 0.01 * product, rel=1e-5)


def test_weight_perturbation_loss_respects_sample_weight_and_layers():
    model = tiny_mlp()
    x, y = data()
    weights = np.zeros(16, np.float32)
    weights[:4] = 1.0
    penalty = P.WeightPerturbationLoss(1.0, epsilon=0.05, complexity_weight=0.0, layers=["logits"])
    model.compile("sgd", LOSS, regularizers=[penalty])
    logs = model.test_on_batch(x, y, sample_weight=weights, return_dict=True)
    result = wp.certified_margins(model, x[:4], y[:4], 0.05, layers=["logits"], mode="norm")
    hinge = np.maximum(result["bounds"] - result["margins"], 0).max(axis=1).mean()
    assert logs["weight_perturbation"] == pytest.approx(hinge, rel=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "factory",
    [
        lambda: P.SharpnessAwareMinimization(rho=0.05),
        lambda: P.WeightPerturbationLoss(0.1, epsilon=0.01),
        lambda: P.WeightPerturbationLoss(0.1, epsilon=0.01, norm="1", mode="activation"),
    ],
    ids=["sam", "wp_norm", "wp_activation"],
)
def test_trains_and_does_not_retrace(factory, jit_compile):
    model = tiny_mlp()
    x, y = data(n=32)
    penalty = factory()
    model.compile(keras.optimizers.SGD(0.05), LOSS, regularizers=[penalty], jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(history.history[penalty.name]))
    if BACKEND == "tensorflow":
        functions = tf_functions(model.train_function)
        assert functions, "expected the train step to be a tf.function"
        assert all(len(f._list_all_concrete_functions()) == 1 for f in functions)
    if BACKEND == "tensorflow" or jit_compile:  # JAX compiles the step only with jit_compile.
        # The compiled programs behind the step (tf.function / jax.jit), not retraced by more steps.
        traces = compiled_count(model.train_function)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert compiled_count(model.train_function) == traces


def test_config_and_keras_round_trip(tmp_path):
    penalties = [
        P.SharpnessAwareMinimization(0.5, rho=0.1, name="sam_half"),
        P.WeightPerturbationLoss(0.2, epsilon=0.02, margin_weight=0.5, complexity_weight=1e-3, norm="1", layers=["logits"], mode="activation"),
    ]
    for penalty in penalties:
        config = penalty.get_config()
        clone = type(penalty).from_config(config)
        assert clone.get_config() == config
        assert P.deserialize(P.serialize(penalty)).get_config() == config
    assert isinstance(P.get("sam"), P.SharpnessAwareMinimization)
    assert isinstance(P.get("weight_perturbation:0.5"), P.WeightPerturbationLoss)
    model = tiny_mlp()
    x, y = data()
    model.compile("sgd", LOSS, regularizers=penalties)
    model.fit(x, y, verbose=0, epochs=1)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [p.get_config() for p in loaded.penalties] == [p.get_config() for p in penalties]
    expected = model.evaluate(x, y, verbose=0, return_dict=True)
    got = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert got["weight_perturbation"] == pytest.approx(expected["weight_perturbation"], rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        P.WeightPerturbationLoss(epsilon=-1.0)
    with pytest.raises(ValueError, match="margin_weight"):
        P.WeightPerturbationLoss(margin_weight=-1.0)
    with pytest.raises(ValueError, match="'inf' and '1'"):
        P.WeightPerturbationLoss(norm="2")
    with pytest.raises(ValueError, match="rho"):
        P.SharpnessAwareMinimization(rho=0.0)
    with pytest.raises(ValueError, match="rho"):
        P.SharpnessAwareMinimization(rho=-0.1)
    x, y = data()
    model = tiny_mlp()
    with pytest.raises(ValueError, match="'missing'.*do not exist"):
        # Penalties are built, and read the model, at compile time.
        model.compile("sgd", LOSS, regularizers=[P.WeightPerturbationLoss(layers=["missing"])])
        model.train_on_batch(x, y)
    model = tiny_mlp(activation="gelu")
    with pytest.raises(kw.structure.StructureError, match="non-monotone"):
        model.compile("sgd", LOSS, regularizers=[P.WeightPerturbationLoss()])
        model.train_on_batch(x, y)
