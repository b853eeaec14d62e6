"""Reading model structure, the scale shift's refusals, and the input-gradient bound on random and trained nets."""

import keras
import numpy as np
import pytest

import keras_wssi as kw
from keras_wssi.analysis import input_gradient_bound
from keras_wssi.analysis import input_jacobian_spectral_norms
from keras_wssi.analysis import scale_shift
from keras_wssi.structure import StructureError

L = keras.layers


def test_weight_layers_kinds_order_and_receptive_fields():
    inputs = keras.Input((12, 12, 2))
    x = L.Conv2D(3, (3, 5), name="conv")(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)
    x = L.SeparableConv2D(4, 2, name="separable")(x)
    x = L.Flatten()(x)
    outputs = L.Dense(5, name="dense")(x)
    layers = kw.structure.weight_layers(kw.Model(inputs, outputs))
    assert [(w.name, w.kind, w.receptive_field, len(w.kernels)) for w in layers] == [
        ("conv", "conv", 15, 1),
        ("depthwise", "depthwise_conv", 9, 1),
        ("separable", "separable_conv", 4, 2),
        ("dense", "dense", 1, 1),
    ]


def test_normalization_is_found_through_homogeneous_ops_only():
    inputs = keras.Input((8, 8, 1))
    a = L.Conv2D(4, 3, name="conv_bn")(inputs)
    a = L.ReLU()(a)
    a = L.MaxPooling2D()(a)
    a = L.BatchNormalization()(a)
    b = L.Conv2D(4, 3, padding="same", activation="tanh", name="conv_tanh_bn")(a)
    b = L.BatchNormalization()(b)
    c = L.Conv2D(4, 3, padding="same", name="conv_plain")(b)
    outputs = L.Dense(3, name="head")(L.Flatten()(c))
    normalized = {w.name: w.normalized for w in kw.structure.weight_layers(kw.Model(inputs, outputs))}
    assert normalized == {"conv_bn": True, "conv_tanh_bn": False, "conv_plain": False, "head": False}


def test_residual_blocks_identity_and_projection_shortcuts():
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(3, 3, padding="same", activation="relu", name="stem")(inputs)
    branch = L.Conv2D(3, 3, padding="same", activation="relu", name="a1")(h)
    branch = L.Conv2D(3, 3, padding="same", name="a2")(branch)
    h = L.ReLU()(L.Add(name="add_identity")([h, branch]))
    branch = L.Conv2D(5, 3, padding="same", name="b1")(h)
    shortcut = L.Conv2D(5, 1, name="projection")(h)
    h = L.Add(name="add_projection")([shortcut, branch])
    outputs = L.Dense(2, name="head")(L.Flatten()(h))
    model = kw.Model(inputs, outputs)
    blocks = {b.name: [[w.name for w in branch] for branch in b.branches] for b in kw.structure.residual_blocks(model)}
    assert blocks == {"add_identity": [[], ["a1", "a2"]], "add_projection": [["projection"], ["b1"]]}


def test_homogeneity_check_flags_inner_layers_but_not_a_final_softmax():
    inputs = keras.Input((4,))
    x = L.Dense(4, activation="relu")(inputs)
    ok = kw.Model(inputs, L.Dense(3, activation="softmax")(x))
    assert kw.structure.non_homogeneous_layers(ok) == []
    assert kw.structure.output_activation(ok) == "softmax"
    bad_inner = L.Dense(4, activation="sigmoid", name="squash")(inputs)
    bad = kw.Model(inputs, L.Dense(3)(L.ReLU(max_value=6.0, name="relu6")(bad_inner)))
    assert kw.structure.non_homogeneous_layers(bad) == ["squash", "relu6"]
    with pytest.raises(StructureError, match="squash"):
        kw.structure.check_homogeneous(bad)


def test_subclassed_models_read_layers_but_refuse_graph_methods():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = L.Dense(4, activation="relu")
            self.second = L.Dense(2)

        def call(self, inputs):
            return self.second(self.first(inputs))

    net = Net()
    net(np.zeros((1, 3), "float32"))
    assert [w.layer for w in kw.structure.weight_layers(net)] == [net.first, net.second]
    with pytest.raises(StructureError, match="subclassed"):
        kw.structure.residual_blocks(net)
    with pytest.raises(StructureError, match="subclassed"):
        scale_shift(net, [2.0, 0.5])


def _shift_fixture():
    return kw.architectures.mlp(input_shape=(3, 3, 1), hidden_units=(5, 4), num_classes=3)


@pytest.mark.parametrize(
    "factors, error, match",
    [
        ([2.0, 2.0, 2.0], StructureError, "multiply to"),
        ([2.0, 0.5], ValueError, "one entry per weight layer"),
        ([2.0, -0.5, -1.0], ValueError, "finite positive"),
        ({"no_such_layer": 2.0}, ValueError, "not weight layers"),
    ],
)
def test_scale_shift_refuses_factors_that_change_the_function(factors, error, match):
    with pytest.raises(error, match=match):
        scale_shift(_shift_fixture(), factors)


def test_scale_shift_refuses_unequal_scales_at_an_add_and_non_homogeneous_models():
    model = kw.architectures.small_resnet(input_shape=(8, 8, 1), channels=2, num_blocks=1)
    with pytest.raises(StructureError, match="block0_add"):
        scale_shift(model, {"block0_conv_a": 2.0, "logits": 0.5})
    inputs = keras.Input((3,))
    tanh_model = kw.Model(inputs, L.Dense(2)(L.Dense(3, activation="tanh")(inputs)))
    with pytest.raises(StructureError, match="homogeneous"):
        scale_shift(tanh_model, [2.0, 0.5])


def test_scale_shift_keeps_function_of_a_sequential_model_with_biases():
    model = keras.Sequential([keras.Input((4,)), L.Dense(6, activation="relu"), L.Dense(5, activation="relu"), L.Dense(3)])
    for layer in model.layers:
        layer.bias.assign(np.random.default_rng(0).normal(size=layer.bias.shape))
    x = np.random.default_rng(1).normal(size=(10, 4)).astype("float32")
    shifted = scale_shift(model, [3.0, 0.1, 1 / 0.3])
    np.testing.assert_allclose(shifted.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    # The original is untouched.
    assert not np.allclose(shifted.layers[0].kernel.numpy(), model.layers[0].kernel.numpy())


def _finite_difference_jacobian(model, x, step=1e-3):
    x = x.astype(np.float64)
    flat = x.reshape(len(x), -1)
    columns = []
    for j in range(flat.shape[1]):
        delta = np.zeros_like(flat)
        delta[:, j] = step
        plus = model.predict((flat + delta).reshape(x.shape).astype("float32"), verbose=0).astype(np.float64)
        minus = model.predict((flat - delta).reshape(x.shape).astype("float32"), verbose=0).astype(np.float64)
        columns.append((plus - minus) / (2 * step))
    return np.stack(columns, axis=-1)  # (batch, C, d)


def test_measured_jacobian_norm_matches_finite_differences():
    model = kw.architectures.small_cnn(input_shape=(5, 5, 1), filters=(2,), dense_units=6, num_classes=3)
    x = np.random.default_rng(0).random((4, 5, 5, 1)).astype("float32")
    expected = np.linalg.norm(_finite_difference_jacobian(model, x), ord=2, axis=(1, 2))
    np.testing.assert_allclose(input_jacobian_spectral_norms(model, x), expected, rtol=2e-2)


def _check_bound_chain(model, x):
    measured = input_jacobian_spectral_norms(model, x)
    spectral = input_gradient_bound(model, "spectral")
    frobenius = input_gradient_bound(model, "frobenius")
    assert measured.max() <= spectral * (1 + 1e-5)
    assert spectral <= frobenius * (1 + 1e-6)
    return measured.max(), spectral, frobenius


@pytest.mark.parametrize("architecture", ["mlp", "cnn", "resnet"])
def test_bound_holds_on_random_networks(architecture):
    kwargs = {
        "mlp": {"hidden_units": (32, 16)},
        "cnn": {"filters": (4, 6), "dense_units": 16},
        "resnet": {"channels": 4, "num_blocks": 2},
    }[architecture]
    model = kw.architectures.build(architecture, input_shape=(12, 12, 1), **kwargs)
    x = np.random.default_rng(0).random((64, 12, 12, 1)).astype("float32")
    _check_bound_chain(model, x)


def test_bound_is_tight_for_a_linear_network():
    """No ReLU masks: J = W2 W1 exactly, so ||J||_2 equals ||W2 W1||_2 and the bound ∏||W_l||_2 ≥ it."""
    inputs = keras.Input((6,))
    model = kw.Model(inputs, L.Dense(3, use_bias=False)(L.Dense(4, use_bias=False)(inputs)))
    w1, w2 = (l.kernel.numpy().astype(np.float64) for l in model.layers[1:])
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    np.testing.assert_allclose(input_jacobian_spectral_norms(model, x), np.linalg.norm(w1 @ w2, 2), rtol=1e-5)
    np.testing.assert_allclose(input_gradient_bound(model), np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2), rtol=1e-6)


def test_conv_operator_norm_bound_holds_against_the_exact_conv_operator():
    """The sqrt(k_h k_w)·||K_mat||_2 factor bounds the true convolution operator norm (power iteration)."""
    conv = L.Conv2D(3, 3, padding="same", use_bias=False)
    # The convolution's matrix, column by column (its images of the basis vectors), and its exact norm.
    basis = np.eye(7 * 7 * 2, dtype="float32").reshape(-1, 7, 7, 2)
    matrix = np.asarray(conv(basis)).reshape(len(basis), -1).T.astype(np.float64)
    true_norm = float(np.linalg.norm(matrix, 2))
    inputs = keras.Input((7, 7, 2))
    model = kw.Model(inputs, conv(inputs))
    bound = kw.analysis.layer_operator_norm_bounds(model)[conv.name]
    assert true_norm <= bound * (1 + 1e-5)


@pytest.mark.slow
def test_bound_holds_on_trained_networks(data_dir):
    images, labels = kw.data.load_arrays("mnist", "train", data_dir=data_dir)
    images, labels = images[:2048], labels[:2048]
    for architecture, kwargs in (
        ("mlp", {"hidden_units": (64, 64)}),
        ("cnn", {"filters": (4, 8), "dense_units": 32}),
        ("resnet", {"channels": 4, "num_blocks": 1}),
    ):
        model = kw.architectures.build(architecture, **kwargs)
        model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        history = model.fit(images, labels, epochs=3, batch_size=64, verbose=0)
        assert history.history["accuracy"][-1] > 0.7, architecture
        measured, spectral, _ = _check_bound_chain(model, images[:200])
        assert measured > 0.0
