"""Interval and linear weight-perturbation certificates (Dense and conv nets): soundness against a float64
weight-space attack and brute-force samples, never looser than the norm chains, certified radius, the loss."""

import os

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wssi as kw
from keras_wssi import backend
from keras_wssi import margin_bounds as mb
from keras_wssi import penalties as P
from keras_wssi import structure
from keras_wssi.analysis import weight_perturbation as wp

import _testing

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
ACTIVATIONS = ["relu", "tanh", "leaky_relu", "elu", "relu6", "linear"]
# The bounds compute in float64 (TensorFlow; JAX with jax_enable_x64), else in float32 (JAX by default); the
# references (perturbed forward passes, the per-example adversary) are independent float64 code, TensorFlow eager
# ops and NumPy on NumPy copies of the weights, whatever the Keras backend. Comparisons allow the bounds' round-off.
ROUND_OFF = 1e-7 if backend.supports_float64() else 1e-5
SLACK = 1e-9 if backend.supports_float64() else 1e-5


def _np(value):
    return np.asarray(value, np.float64)


def _randomize_biases(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.3, layer.bias.shape).astype("float32"))
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(-1.5, 1.5, layer.gamma.shape).astype("float32"))  # Negative scales too.
            layer.beta.assign(rng.normal(0, 0.3, layer.beta.shape).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.3, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, layer.moving_variance.shape).astype("float32"))


def _mlp(input_dim, hidden, classes, activation="relu", seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    x = inputs
    for index, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation=activation, name=f"hidden_{index}")(x)
    model = keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x))
    _randomize_biases(model, seed)
    return model


def _cnn(variant, seed=0, channels=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, channels))
    if variant == "a":  # same padding, BatchNorm, max-pool, valid stride-1 conv, tanh.
        x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv_a")(inputs)
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.MaxPooling2D(2)(x)
        x = keras.layers.Conv2D(4, 3, padding="valid", activation="tanh", name="conv_b")(x)
    else:  # stride-2 same padding, zero padding, average pool, overlapping max-pool, leaky ReLU.
        x = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="leaky_relu", name="conv_a")(inputs)
        x = keras.layers.ZeroPadding2D(1)(x)
        x = keras.layers.AveragePooling2D(2, strides=1)(x)
        x = keras.layers.Conv2D(4, 2, strides=1, padding="valid", activation="relu", name="conv_b")(x)
        x = keras.layers.MaxPooling2D(2, strides=1)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, activation="relu", name="dense")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    _randomize_biases(model, seed)
    return model


def _forward64(model, x, deltas):
    """Logits `(B, C)` in float64 with per-example kernels `K_l + Δ_l[b]` (Δ as `(B, fan_in, fan_out)`),
    written layer by layer from the Keras layers (independent of keras_wssi.margin_bounds). Also returns the
    input of every layer, in order."""
    h = tf.constant(_np(x))
    index = 0
    seen = []
    for layer in model.layers[1:]:
        seen.append(h)
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            kernel = tf.constant(_np(layer.kernel))
            matrix = tf.reshape(kernel, [-1, kernel.shape[-1]])[None] + tf.cast(deltas[index], tf.float64)
            index += 1
            if isinstance(layer, keras.layers.Dense):
                h = tf.einsum("bi,bio->bo", h, matrix)
            else:
                per_example = [
                    tf.nn.conv2d(h[b : b + 1], tf.reshape(matrix[b], kernel.shape), layer.strides, layer.padding.upper())
                    for b in range(h.shape[0])
                ]
                h = tf.concat(per_example, 0)
            h = h + tf.constant(_np(layer.bias))
            name = layer.activation.__name__
            h = {"relu": tf.nn.relu, "tanh": tf.tanh, "linear": tf.identity, "elu": tf.nn.elu,
                 "relu6": tf.nn.relu6, "leaky_relu": lambda t: tf.where(t < 0, 0.2 * t, t)}[name](h)
        elif isinstance(layer, keras.layers.BatchNormalization):
            mean, variance = (tf.constant(_np(v)) for v in (layer.moving_mean, layer.moving_variance))
            gamma, beta = tf.constant(_np(layer.gamma)), tf.constant(_np(layer.beta))
            h = (h - mean) / tf.sqrt(variance + layer.epsilon) * gamma + beta
        elif isinstance(layer, keras.layers.MaxPooling2D):
            h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding.upper())
        elif isinstance(layer, keras.layers.AveragePooling2D):
            h = tf.nn.avg_pool2d(h, layer.pool_size, layer.strides, layer.padding.upper())
        elif isinstance(layer, keras.layers.ZeroPadding2D):
            (t, b), (l, r) = layer.padding
            h = tf.pad(h, [[0, 0], [t, b], [l, r], [0, 0]])
        elif isinstance(layer, keras.layers.Flatten):
            h = tf.reshape(h, [h.shape[0], -1])
        else:
            raise AssertionError(f"test forward: unexpected layer {layer}")
    return h, seen


def _shapes(model):
    return [(int(np.prod(l.kernel.shape[:-1])), l.kernel.shape[-1]) for l in model.layers if hasattr(l, "kernel")]


def _operator_norms(deltas, norm):
    if norm == "inf":
        return np.abs(deltas).sum(axis=-2).max(axis=-1)
    if norm == "1":
        return np.abs(deltas).sum(axis=-1).max(axis=-1)
    return np.linalg.norm(deltas, 2, axis=(-2, -1))


def project_to_ball(matrices, radius, norm):
    """`_testing.project_to_ball` as a float64 tensor."""
    return tf.constant(_testing.project_to_ball(_np(matrices), _np(radius), norm))


def steepest_ascent_vertex(gradient, radius, norm):
    """`_testing.steepest_ascent_vertex` (NumPy float64)."""
    return _testing.steepest_ascent_vertex(_np(gradient), _np(radius), norm)


def _attack(model, x, y, target, radii, norm, steps=30, seed=1):
    """Per-example projected gradient descent (float64) on the margin `m_{y,target}` over Δ in the balls
    (`radii`: per layer, a number or one radius per example); returns the lowest margin reached by any iterate
    `(B,)` (each iterate checked to lie in the ball)."""
    rng = np.random.default_rng(seed)
    radii = [np.broadcast_to(np.asarray(r, np.float64), (len(x),)) for r in radii]
    batch = len(x)
    lowest = np.full(batch, np.inf)
    for restart in range(2):
        deltas = [
            project_to_ball(tf.constant(rng.normal(0, 1e-2 if restart else 1e-6, (batch, *s))), r, norm) if np.any(r > 0)
            else tf.zeros((batch, *s), tf.float64)
            for s, r in zip(_shapes(model), radii)
        ]
        for step in range(steps + 1):
            for d, r in zip(deltas, radii):
                assert np.all(_operator_norms(d.numpy(), norm) <= r * (1 + 1e-9) + 1e-15)
            with tf.GradientTape() as tape:
                tape.watch(deltas)
                logits, _ = _forward64(model, x, deltas)
                margin = tf.gather(logits, y, axis=1, batch_dims=1) - tf.gather(logits, target, axis=1, batch_dims=1)
                objective = -tf.reduce_sum(margin)
            lowest = np.minimum(lowest, margin.numpy())
            if step == steps:
                break
            gradients = tape.gradient(objective, deltas)
            size = 1.0 / (1 + step) ** 0.5
            deltas = [
                project_to_ball(d.numpy() + size * steepest_ascent_vertex(g.numpy(), r, norm), r, norm) if np.any(r > 0) else d
                for d, g, r in zip(deltas, gradients, radii)
            ]
    return lowest


def _sphere_samples(model, batch, radii, norm, rng, draws):
    """Random perturbations on the spheres `||Δ_l|| = ε_l`: uniform, Gaussian and sign (vertex-like) entries."""
    for draw in range(draws):
        deltas = []
        for shape, radius in zip(_shapes(model), radii):
            kind = draw % 3
            raw = (rng.uniform(-1, 1, (batch, *shape)) if kind == 0 else rng.normal(size=(batch, *shape)) if kind == 1
                   else np.sign(rng.normal(size=(batch, *shape))) * (rng.random((batch, *shape)) < 0.2))
            norms = np.maximum(_operator_norms(raw, norm), 1e-12)
            deltas.append(tf.constant(raw * (radius / norms)[:, None, None]))
        yield deltas


def _check_sound(model, x, y, epsilon, norm, mode, draws=12, steps=25):
    result = wp.certified_margins(model, x, y, epsilon, norm=norm, mode=mode)
    radii = list(result["radii"])
    lower = result["margins"] - result["bounds"]
    classes = lower.shape[1]
    tolerance = ROUND_OFF * (1 + np.abs(result["margins"]).max())
    rng = np.random.default_rng(0)
    zeros = [tf.zeros((len(x), *s), tf.float64) for s in _shapes(model)]
    clean, _ = _forward64(model, x, zeros)
    np.testing.assert_allclose(result["margins"], (tf.gather(clean, y, axis=1, batch_dims=1)[:, None] - clean).numpy(), atol=1e-4)
    for deltas in _sphere_samples(model, len(x), radii, norm, rng, draws):
        logits, _ = _forward64(model, x, deltas)
        perturbed = (tf.gather(logits, y, axis=1, batch_dims=1)[:, None] - logits).numpy()
        assert np.all(perturbed >= lower - tolerance), (lower - perturbed).max()
    slack = np.where(np.eye(classes, dtype=bool)[y], np.inf, lower)
    target = np.argmin(slack, axis=1)
    attacked = _attack(model, x, y, target, radii, norm, steps=steps)
    assert np.all(attacked >= lower[np.arange(len(x)), target] - tolerance), (lower[np.arange(len(x)), target] - attacked).max()
    return result


@hypothesis.settings(max_examples=7, deadline=None, derandomize=True)
@hypothesis.given(
    depth=st.integers(1, 3),
    width=st.integers(2, 7),
    classes=st.integers(2, 4),
    activation=st.sampled_from(ACTIVATIONS),
    norm=st.sampled_from(["inf", "1", "2"]),
    log_epsilon=st.floats(-3.0, -0.5),
    seed=st.integers(0, 1000),
)
def test_dense_bounds_are_sound_and_never_looser(depth, width, classes, activation, norm, log_epsilon, seed):
    model = _mlp(5, (width,) * (depth - 1), classes, activation=activation, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5, 5)).astype("float32")
    y = rng.integers(0, classes, 5)
    epsilon = 10.0**log_epsilon
    bounds = {mode: wp.certified_margins(model, x, y, epsilon, norm=norm, mode=mode)["bounds"] for mode in wp.MODES}
    scale = SLACK * (1 + np.abs(bounds["norm"]))
    assert np.all(bounds["activation"] <= bounds["norm"] + scale)
    assert np.all(bounds["interval"] <= bounds["activation"] + scale)
    assert np.all(bounds["linear"] <= bounds["interval"] + scale)
    _check_sound(model, x, y, epsilon, norm, "linear", draws=9, steps=15)


@pytest.mark.parametrize("variant,norm", [("a", "inf"), ("b", "inf"), ("a", "1"), ("b", "2")])
def test_conv_bounds_are_sound(variant, norm):
    model = _cnn(variant, seed=3, channels=2 if variant == "b" else 1)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 3, 4)
    radius = wp.certified_radius(model, x, np.argmax(model.predict(x, verbose=0), 1), 1.0, norm=norm, iterations=8)
    epsilon = float(np.median(radius)) * 2.0  # Some certified, some not: the bounds are exercised both ways.
    for mode in ("interval", "linear"):
        _check_sound(model, x, y, epsilon, norm, mode, draws=6, steps=12)
    interval = wp.certified_margins(model, x, y, epsilon, norm=norm, mode="interval")["bounds"]
    linear = wp.certified_margins(model, x, y, epsilon, norm=norm, mode="linear")["bounds"]
    assert np.all(linear <= interval + SLACK * (1 + interval))


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_boxes_contain_sampled_activations(model_kind):
    model = _mlp(6, (8, 8), 4, activation="tanh", seed=2) if model_kind == "mlp" else _cnn("a", seed=2)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (3, *model.input_shape[1:])).astype("float32")
    y = np.array([0, 1, 2])
    chain = structure.feedforward_chain(model)
    radii = [0.05] * len(chain.weight_ops)
    dense = structure.dense_chain(model) if model_kind == "mlp" else None
    for mode in ("interval", "linear"):
        result = mb.bound_margins(chain, x, y, radii, "inf", mode, dense=dense)
        # The boxes entering the weight layers and the pre-activations, matched to the Keras layers' inputs.
        weight_boxes = [box for box, op in zip(result["boxes"], chain.ops) if op.kind in ("dense", "conv")]
        lower = np.asarray(result["lower"])
        for deltas in _sphere_samples(model, len(x), radii, "inf", rng, draws=30):
            logits, seen = _forward64(model, x, deltas)
            inputs = [h for h, layer in zip(seen, model.layers[1:]) if hasattr(layer, "kernel")]
            for (low, high), h in zip(weight_boxes, inputs):
                scale = SLACK * (1 + np.abs(h.numpy()))
                assert np.all(h.numpy() >= np.asarray(low) - scale) and np.all(h.numpy() <= np.asarray(high) + scale)
            perturbed = (tf.gather(logits, y, axis=1, batch_dims=1)[:, None] - logits).numpy()
            assert np.all(perturbed >= lower - SLACK * (1 + np.abs(perturbed)))


def _mnist(n, offset=0):
    try:
        images, labels = kw.data.load_arrays("mnist", "train", DATA_DIR)
    except Exception as error:  # pragma: no cover - the data ships with the repository's checkout.
        pytest.skip(f"MNIST not available: {error}")
    return np.asarray(images[offset : offset + n]), np.asarray(labels[offset : offset + n])


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_trained_networks_certified_radius_is_sound_and_not_vacuous(model_kind):
    x, y = _mnist(2000)
    keras.utils.set_random_seed(0)
    if model_kind == "mlp":
        model = kw.architectures.mlp(hidden_units=(32, 32))
    else:
        model = kw.architectures.small_cnn(filters=(4,), dense_units=16)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    # A model this briefly trained misclassifies many (radius 0), more or fewer with each backend's random
    # streams: certify 30 candidates and attack (at most) the first 6 with a positive radius.
    xt, yt = _mnist(30, offset=50000)
    radius = wp.certified_radius(model, xt, yt, 1.0, iterations=10)
    keep = radius > 0
    xt, yt, radius = xt[keep][:6], yt[keep][:6], radius[keep][:6]
    assert len(xt) >= 3
    targets = np.argsort(model.predict(xt, verbose=0), axis=1)[:, -2]  # The runner-up class.
    if model_kind == "cnn":
        xt, yt, radius, targets = xt[:3], yt[:3], radius[:3], targets[:3]
    reached = [_attack(model, xt, yt, targets, [radius * factor] * len(_shapes(model)), "inf", steps=20) for factor in (1.0, 8.0)]
    assert np.all(reached[0] > 0)  # Sound: no flip inside the certified radius (float64).
    assert np.mean(reached[1] < 0) >= 0.5  # Not vacuous: the attack flips most at 8× the certified radius.


def test_certified_radius_is_the_bisection_edge():
    model = _mlp(6, (10, 10), 3, seed=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), 1)
    y[:2] = (y[:2] + 1) % 3
    radius = wp.certified_radius(model, x, y, 1.0, max_radius=10.0, iterations=16)
    assert np.all(radius[:2] == 0.0) and np.all(radius[2:] > 0)
    for b in range(2, 12):
        assert wp.certified_margins(model, x[b : b + 1], y[b : b + 1], radius[b])["certified"][0]
        if radius[b] < 10.0:
            assert not wp.certified_margins(model, x[b : b + 1], y[b : b + 1], radius[b] * 1.01)["certified"][0]
    layered = wp.certified_radius(model, x[2:4], y[2:4], {"logits": 1.0})
    assert np.all(layered >= radius[2:4])  # Perturbing one layer only certifies at least as far.
    with pytest.raises(ValueError, match="max_radius must be positive"):
        wp.certified_radius(model, x, y, max_radius=0.0)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        wp.certified_radius(model, x, y, iterations=0)


def test_readers_refuse_clearly():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, dilation_rate=2, name="dilated")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    with pytest.raises(structure.StructureError, match="'dilated' has dilation"):
        structure.feedforward_chain(model)
    inputs = keras.Input((8, 1))
    x = keras.layers.Conv1D(2, 3, name="conv1d")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    with pytest.raises(structure.StructureError, match="'conv1d' \\(Conv1D\\) is not supported"):
        structure.feedforward_chain(model)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    with pytest.raises(structure.StructureError, match="Dense layer 'head' is applied to a rank-4"):
        wp.certified_margins(model, np.zeros((1, 4, 4, 1), np.float32), [0], 0.1)


def test_training_loss_interval_and_linear_modes():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(6, activation="relu", name="hidden")(inputs)
    model = kw.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.integers(0, 3, 16).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    penalty = P.WeightPerturbationLoss(1.0, epsilon=0.05, complexity_weight=0.0, mode="interval")
    model.compile(keras.optimizers.SGD(0.0), loss, regularizers=[penalty])
    logs = model.test_on_batch(x, y, return_dict=True)
    # Hinge [bound − margin]_+ with bound = margin − lower: the mean of max_i [−lower_{y,i}]_+.
    k1, b1, k2, b2 = (np.asarray(v, np.float64) for v in model.trainable_variables)
    z = x.astype(np.float64) @ k1 + b1
    spread = 0.05 * np.abs(x).max(axis=1, keepdims=True)
    low, high = np.maximum(z - spread, 0), np.maximum(z + spread, 0)
    center, radius = (low + high) / 2, (high - low) / 2
    budget = 0.05 * np.maximum(np.abs(low), np.abs(high)).max(axis=1)
    expected = []
    for b in range(16):
        lowers = [
            (k2[:, y[b]] - k2[:, i]) @ center[b] - np.abs(k2[:, y[b]] - k2[:, i]) @ radius[b] + b2[y[b]] - b2[i] - 2 * budget[b]
            for i in range(3) if i != y[b]
        ]
        expected.append(max(0.0, -min(lowers)))
    assert logs["weight_perturbation"] == pytest.approx(np.mean(expected), rel=1e-5, abs=1e-6)
    # The linear mode is never above the interval mode, and both train a CNN (finite, weights move).
    cnn = kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(2,), dense_units=4, num_classes=3)
    images = rng.uniform(0, 1, (8, 8, 8, 1)).astype("float32")
    values = {}
    for mode in ("interval", "linear"):
        cnn.compile(keras.optimizers.SGD(0.0), loss, regularizers=[P.WeightPerturbationLoss(1.0, epsilon=0.05, mode=mode, complexity_weight=0.0)])
        values[mode] = cnn.test_on_batch(images, y[:8], return_dict=True)["weight_perturbation"]
    assert values["linear"] <= values["interval"] + 1e-5
    before = [w.copy() for w in cnn.get_weights()]
    cnn.compile(keras.optimizers.SGD(0.1), loss, regularizers=[P.WeightPerturbationLoss(1.0, epsilon=0.05, mode="interval")])
    logs = cnn.train_on_batch(images, y[:8], return_dict=True)
    assert np.isfinite(logs["loss"]) and not np.allclose(before[0], cnn.get_weights()[0])
    config = P.WeightPerturbationLoss(1.0, mode="linear").get_config()
    assert config["mode"] == "linear"


def test_certified_curve_goes_into_the_report_next_to_the_attacked_curves():
    from keras_wssi.evaluation import report as report_module
    from keras_wssi.evaluation.weight_perturbation import evaluate_weight_perturbations

    model = _mlp(6, (10,), 3, seed=5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), 1)
    epsilons = [0.0, 0.01, 0.1, 0.5]
    report = report_module.Report("weights")
    report.add_model("mlp")
    attacked = evaluate_weight_perturbations(model, x, y, epsilons, kind="adversarial", steps=5)
    report.add_curve("mlp", "weights/adversarial", attacked)
    curve = report_module.add_certified_weight_curve(report, "mlp", model, x, y, epsilons)
    expected = [wp.certified_accuracy(model, x, y, e, relative=True) for e in epsilons]
    assert curve["accuracy"] == expected == report.models["mlp"]["curves"]["weights/certified"]["accuracy"]
    # What is proven never exceeds what the attack leaves, and the certificate binds somewhere.
    assert all(c <= a + 1e-12 for c, a in zip(curve["accuracy"], attacked["accuracy"]))
    assert curve["accuracy"][0] == 1.0 and curve["accuracy"] == sorted(curve["accuracy"], reverse=True)
    resnet = kw.architectures.small_resnet(input_shape=(8, 8, 1), channels=2, num_blocks=1)
    report.add_model("resnet")
    assert report_module.add_certified_weight_curve(report, "resnet", resnet, np.zeros((2, 8, 8, 1), np.float32), [0, 1], epsilons) is None
    assert "block0_add" in report.models["resnet"]["notes"][0]


def test_degenerate_inputs_give_clear_errors_or_vacuous_bounds():
    model = _mlp(4, (5,), 3, seed=6)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="at least one example"):
        wp.certified_margins(model, x[:0], y[:0], 0.1)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        wp.certified_margins(model, bad, y, 0.1)
    for mode in wp.MODES:  # An astronomically large radius: a vacuous (infinite) bound, never NaN.
        result = wp.certified_margins(model, x, y, 1e300, mode=mode)
        assert not np.isnan(result["bounds"]).any() and not result["certified"].any()


def test_compute_dtype_is_float64_where_the_backend_has_it():
    assert mb.compute_dtype("float32") == "float32"
    expected = "float64" if backend.supports_float64() else "float32"
    assert mb.compute_dtype("float64") == expected
    model = _mlp(4, (5,), 3, seed=7)
    chain = structure.feedforward_chain(model)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    result = mb.bound_margins(chain, x, np.array([0, 1]), [0.01, 0.01], "inf", "interval")  # default dtype: float64
    assert keras.backend.standardize_dtype(result["lower"].dtype) == expected


@pytest.mark.parametrize("strides", [2, 1])
def test_max_pool_arg_max_is_the_same_compiled_and_eager_under_ties(strides):
    """ReLU outputs tie at 0 inside pooling windows; the arg-max read, the masked competitors and the routed
    coefficients use one choice (the first maximum), so the compiled bound (where a backend's max-pool derivative
    may break ties its own way: XLA's did) equals the eager one."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
    h = keras.layers.MaxPooling2D(2, strides=strides)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, activation="relu", name="dense")(h)
    model = kw.Model(inputs, keras.layers.Dense(3, name="logits")(h))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    chain = structure.feedforward_chain(model)
    radii = [0.01] * 3

    def lower(xt, yt):
        return mb.bound_margins(chain, xt, yt, radii, "inf", "linear", refine_limit=0, dtype="float32")["lower"]

    eager = np.asarray(lower(x, y))
    compiled = np.asarray(backend.function(lower, model.variables)(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)))
    np.testing.assert_allclose(compiled, eager, rtol=2e-6, atol=1e-6)
