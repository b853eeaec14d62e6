"""The weight-perturbation margin certificate (Tsai et al. 2021; DESIGN.md §1.4): exactness, validity, errors."""

import math

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wssi as kw
from keras_wssi import backend
from keras_wssi.analysis import weight_perturbation as wp
from _testing import project_to_ball
from _testing import steepest_ascent_vertex

# The certificates compute in float64 (TensorFlow; JAX with jax_enable_x64), else in float32 (JAX by default):
# comparisons with exact values allow that dtype's round-off.
ROUND_OFF = 1e-6 if backend.supports_float64() else 1e-5

# The references below (perturbed margins, the per-example adversary) are independent float64 code: TensorFlow
# eager ops and NumPy on NumPy copies of the weights, whatever the Keras backend of the code under test.
_TF_ACTIVATIONS = {
    "relu": tf.nn.relu,
    "tanh": tf.tanh,
    "leaky_relu": lambda h: tf.nn.leaky_relu(h, 0.2),  # Keras's default negative slope.
    "linear": tf.identity,
}


def _mlp(input_dim, hidden, classes, activation="relu", use_bias=True, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,))
    x = inputs
    for index, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation=activation, use_bias=use_bias, name=f"hidden_{index}")(x)
    outputs = keras.layers.Dense(classes, use_bias=use_bias, name="logits")(x)
    model = keras.Model(inputs, outputs)
    if use_bias:  # Non-zero biases, so that they matter.
        for layer in model.layers[1:]:
            layer.bias.assign(np.random.default_rng(seed).normal(0, 0.3, layer.bias.shape).astype("float32"))
    return model


def _perturbed_margins(model, x, y, deltas):
    """Margins `(B, C)` of the network with per-example kernels `K_l + Δ_l[b]` (float64, independent code)."""
    h = tf.constant(np.asarray(x, np.float64).reshape(len(x), -1))
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    for index, (layer, delta) in enumerate(zip(dense, deltas)):
        kernel = tf.constant(np.asarray(layer.kernel, np.float64))[None] + delta
        h = tf.einsum("bi,bio->bo", h, kernel)
        if layer.bias is not None:
            h = h + tf.constant(np.asarray(layer.bias, np.float64))
        if index < len(dense) - 1:
            h = _TF_ACTIVATIONS[layer.activation.__name__](h)
    true = tf.gather(h, y, axis=1, batch_dims=1)
    return true[:, None] - h


def _operator_norms(deltas, norm):
    if norm == "inf":
        return np.abs(deltas).sum(axis=-2).max(axis=-1)
    if norm == "1":
        return np.abs(deltas).sum(axis=-1).max(axis=-1)
    return np.linalg.norm(deltas, 2, axis=(-2, -1))


def _adversarial_margin_drop(model, x, y, radii, norm, target, steps=40):
    """Per-example projected gradient descent on the margin `m_{y,target}` over per-example Δ in the balls."""
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    batch = len(x)
    deltas = [tf.zeros([batch, *l.kernel.shape], tf.float64) for l in dense]
    rng = np.random.default_rng(1)
    # A random start inside the ball (zero can be a saddle for ReLU masks).
    deltas = [tf.constant(project_to_ball(rng.normal(0, 1e-3, d.shape), r, norm)) for d, r in zip(deltas, radii)]
    best = np.full(batch, -np.inf)
    clean = _perturbed_margins(model, x, y, [tf.zeros_like(d) for d in deltas]).numpy()[np.arange(batch), target]
    for step in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(deltas)
            margins = _perturbed_margins(model, x, y, deltas)
            chosen = tf.gather(margins, target, axis=1, batch_dims=1)
            objective = tf.reduce_sum(-chosen)
        best = np.maximum(best, clean - chosen.numpy())
        gradients = tape.gradient(objective, deltas)
        size = 1.0 / (1 + step) ** 0.5
        deltas = [
            tf.constant(project_to_ball(d.numpy() + size * steepest_ascent_vertex(g.numpy(), r, norm), r, norm)) if r > 0 else d
            for d, g, r in zip(deltas, gradients, radii)
        ]
    margins = _perturbed_margins(model, x, y, deltas)
    final = clean - tf.gather(margins, target, axis=1, batch_dims=1).numpy()
    for d, r in zip(deltas, radii):
        assert np.all(_operator_norms(d.numpy(), norm) <= r * (1 + 1e-9) + 1e-12)
    return np.maximum(best, final)


def _design_formula(model, x, y, epsilon):
    """DESIGN.md §1.4, verbatim (bias-free, ∞-norm)."""
    dense = [np.asarray(l.kernel, np.float64).T for l in model.layers if isinstance(l, keras.layers.Dense)]
    a = [np.abs(w).sum(axis=1).max() for w in dense]
    scale = np.abs(x.reshape(len(x), -1)).max(axis=1)
    perturbed = np.prod([ai + epsilon for ai in a[:-1]])
    clean = np.prod(a[:-1])
    last = dense[-1]
    bounds = np.zeros((len(x), last.shape[0]))
    for b in range(len(x)):
        for i in range(last.shape[0]):
            if i != y[b]:
                bounds[b, i] = scale[b] * (
                    np.abs(last[y[b]] - last[i]).sum() * (perturbed - clean) + 2 * epsilon * perturbed
                )
    return bounds


def test_norm_mode_equals_design_formula_without_biases():
    model = _mlp(7, (6, 5), 4, use_bias=False)
    x = np.random.default_rng(0).normal(size=(9, 7)).astype("float32")
    y = np.arange(9) % 4
    result = wp.certified_margins(model, x, y, epsilon=0.05, norm="inf", mode="norm")
    np.testing.assert_allclose(result["bounds"], _design_formula(model, x, y, 0.05), rtol=1e-5)


def test_design_formula_is_invalid_with_biases_and_ours_is_valid():
    # Tiny first-layer weights, a large bias: h_1 ≈ relu(b_1) is far larger than ∏ a_l · ||x||.
    keras.utils.set_random_seed(0)
    model = _mlp(3, (4,), 2, use_bias=True)
    model.layers[1].kernel.assign(np.full((3, 4), 0.01, np.float32))
    model.layers[1].bias.assign(np.full((4,), 5.0, np.float32))
    x = np.ones((1, 3), np.float32)
    y = np.array([0])
    epsilon = 0.1
    # Worst case on the last layer alone: Δ[y] = −ε e_j, Δ[i] = +ε e_j (each row ℓ1 = ε) drops the margin
    # by 2ε h_j.
    hidden = np.maximum(x @ np.asarray(model.layers[1].kernel) + np.asarray(model.layers[1].bias), 0)
    achieved = 2 * epsilon * hidden.max()
    design = _design_formula(model, x, y, epsilon)[0, 1]
    ours = wp.certified_margins(model, x, y, {"logits": epsilon}, norm="inf")["bounds"][0, 1]
    assert design < achieved  # DESIGN.md's formula (no bias term) is violated here.
    assert ours >= achieved * (1 - ROUND_OFF)


@pytest.mark.parametrize("norm", ["inf", "1", "2"])
def test_certificate_is_the_exact_worst_case_for_one_linear_layer(norm):
    model = _mlp(6, (), 4, use_bias=True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 6)).astype("float32")
    y = np.array([0, 1, 2, 3, 0])
    epsilon = 0.2
    result = wp.certified_margins(model, x, y, epsilon, norm=norm)
    x64 = x.astype(np.float64)
    for b in range(len(x)):
        for i in range(4):
            if i == y[b]:
                continue
            # The maximizer of (Δx)_i − (Δx)_y over the ball, in Keras layout (kernel = Wᵀ).
            w = np.zeros((4, 6))
            if norm == "inf":
                j = np.argmax(np.abs(x64[b]))
                w[i, j], w[y[b], j] = epsilon * np.sign(x64[b, j]), -epsilon * np.sign(x64[b, j])
            elif norm == "1":
                w[i], w[y[b]] = epsilon / 2 * np.sign(x64[b]), -epsilon / 2 * np.sign(x64[b])
            else:
                direction = x64[b] / np.linalg.norm(x64[b])
                w[i], w[y[b]] = epsilon / math.sqrt(2) * direction, -epsilon / math.sqrt(2) * direction
            delta = w.T[None]
            assert _operator_norms(delta, norm)[0] <= epsilon * (1 + 1e-12)
            clean = _perturbed_margins(model, x[b : b + 1], y[b : b + 1], [tf.zeros_like(delta)])
            moved = _perturbed_margins(model, x[b : b + 1], y[b : b + 1], [tf.constant(delta)])
            drop = float(clean[0, i] - moved[0, i])
            np.testing.assert_allclose(drop, result["bounds"][b, i], rtol=1e-5)
    # And the per-example adversary (the one used for the validity tests) reaches the bound.
    target = (y + 1) % 4
    adversarial = _adversarial_margin_drop(model, x, y, [epsilon], norm, target, steps=15)
    np.testing.assert_allclose(adversarial, result["bounds"][np.arange(5), target], rtol=1e-3)


@pytest.mark.slow
@hypothesis.settings(max_examples=18, deadline=None, derandomize=True)
@hypothesis.given(
    depth=st.integers(1, 3),
    width=st.integers(2, 7),
    input_dim=st.integers(2, 6),
    classes=st.integers(2, 5),
    activation=st.sampled_from(["relu", "tanh", "leaky_relu", "linear"]),
    use_bias=st.booleans(),
    norm=st.sampled_from(["inf", "1", "2"]),
    mode=st.sampled_from(["norm", "activation", "interval", "linear"]),
    log_epsilon=st.floats(-3.0, 0.0),
    only_one_layer=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_certificate_is_never_violated(
    depth, width, input_dim, classes, activation, use_bias, norm, mode, log_epsilon, only_one_layer, seed
):
    model = _mlp(input_dim, (width,) * (depth - 1), classes, activation=activation, use_bias=use_bias, seed=seed)
    rng = np.random.default_rng(seed)
    batch = 6
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    y = rng.integers(0, classes, batch)
    epsilon = 10.0**log_epsilon
    names = [l.name for l in model.layers if isinstance(l, keras.layers.Dense)]
    layers = [names[seed % len(names)]] if only_one_layer else None
    result = wp.certified_margins(model, x, y, epsilon, norm=norm, layers=layers, mode=mode)
    radii = list(result["radii"])
    bounds = result["bounds"]
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    clean = _perturbed_margins(model, x, y, [tf.zeros([batch, *l.kernel.shape], tf.float64) for l in dense]).numpy()
    tolerance = 1e-4 * (1.0 + bounds)
    # Random perturbations on the sphere ||Δ_l|| = ε_l, uniform and Gaussian entries.
    for draw in range(20):
        deltas = []
        for layer, radius in zip(dense, radii):
            raw = rng.uniform(-1, 1, (batch, *layer.kernel.shape)) if draw % 2 else rng.normal(size=(batch, *layer.kernel.shape))
            deltas.append(tf.constant(raw * (radius / _operator_norms(raw, norm))[:, None, None]))
        drop = clean - _perturbed_margins(model, x, y, deltas).numpy()
        assert np.all(drop <= bounds + tolerance), (drop - bounds).max()
    # Adversarial: per example, against the pair with the smallest certified slack.
    slack = np.where(np.eye(classes, dtype=bool)[y], np.inf, clean - bounds)
    target = np.argmin(slack, axis=1)
    drop = _adversarial_margin_drop(model, x, y, radii, norm, target, steps=25)
    assert np.all(drop <= bounds[np.arange(batch), target] + tolerance[np.arange(batch), target])


def test_activation_mode_is_tighter_and_certified_accuracy_behaves():
    model = _mlp(8, (16, 16), 5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), axis=1)  # all correctly classified
    y[:8] = (y[:8] + 1) % 5
    norm_mode = wp.certified_margins(model, x, y, 0.01, mode="norm")
    activation_mode = wp.certified_margins(model, x, y, 0.01, mode="activation")
    assert np.all(activation_mode["bounds"] <= norm_mode["bounds"] * (1 + 1e-5) + 1e-7)
    assert wp.certified_accuracy(model, x, y, 0.0) == pytest.approx(56 / 64)
    accuracies = [wp.certified_accuracy(model, x, y, e, mode="activation") for e in (0.0, 1e-3, 1e-2, 1e-1, 1.0)]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] < accuracies[0]


def test_only_chosen_layers_are_perturbed():
    model = _mlp(5, (6,), 3)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    y = np.array([0, 1, 2, 0])
    result = wp.certified_margins(model, x, y, 0.1, layers=["logits"], mode="activation")
    np.testing.assert_allclose(result["radii"], [0.0, 0.1])
    hidden = np.maximum(x @ np.asarray(model.layers[1].kernel) + np.asarray(model.layers[1].bias), 0)
    expected = 2 * 0.1 * np.abs(hidden).max(axis=1)
    off_diagonal = ~np.eye(3, dtype=bool)[y]
    np.testing.assert_allclose(result["bounds"][off_diagonal], np.repeat(expected, 2), rtol=1e-5)
    relative = wp.certified_margins(model, x, y, 0.1, layers=["hidden_0"], relative=True)
    a = float(wp.operator_norm(model.layers[1].kernel, "inf"))
    np.testing.assert_allclose(relative["radii"], [0.1 * a, 0.0], rtol=1e-6)


def test_generalization_bound_formula_and_monotonicity():
    model = _mlp(4, (5,), 3, use_bias=False)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (50, 4)).astype("float32")
    y = rng.integers(0, 3, 50)
    result = wp.generalization_bound(model, x, y, 0.01, margin=0.5)
    a = [float(wp.operator_norm(l.kernel, "inf")) for l in model.layers[1:]]
    expected = 2.0 * np.abs(x).max() * (a[0] + 0.01) * (a[1] + 0.01) * math.sqrt(2 * math.log(8) / 50)
    assert result["rademacher"] == pytest.approx(expected, rel=1e-5)
    larger = wp.generalization_bound(model, x, y, 0.1, margin=0.5)
    assert larger["rademacher"] > result["rademacher"] and larger["bound"] >= result["bound"]
    assert 0.0 <= result["empirical_margin_loss"] <= 1.0


def test_bad_input_gets_clear_errors():
    model = _mlp(4, (5,), 3)
    x = np.zeros((2, 4), np.float32)
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="epsilon.*non-negative"):
        wp.certified_margins(model, x, y, -0.1)
    with pytest.raises(ValueError, match="epsilon.*non-negative"):
        wp.certified_margins(model, x, y, float("nan"))
    with pytest.raises(ValueError, match="layers.*'nope'.*do not exist"):
        wp.certified_margins(model, x, y, 0.1, layers=["nope"])
    with pytest.raises(ValueError, match="epsilon names layers"):
        wp.certified_margins(model, x, y, {"nope": 0.1})
    with pytest.raises(ValueError, match="norm must be an operator norm"):
        wp.certified_margins(model, x, y, 0.1, norm="frobenius")
    with pytest.raises(ValueError, match="margin"):
        wp.generalization_bound(model, x, y, 0.1, margin=0.0)
    for activation, message in (("gelu", "non-monotone"), ("silu", "non-monotone"), ("sigmoid", "σ\\(0\\) ≠ 0")):
        with pytest.raises(kw.structure.StructureError, match=message):
            wp.certified_margins(_mlp(4, (5,), 3, activation=activation), x, y, 0.1)
    inputs = keras.Input((4,))
    softmax = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(5, activation="relu")(inputs)))
    with pytest.raises(kw.structure.StructureError, match="logits"):
        wp.certified_margins(softmax, x, y, 0.1)
    cnn = kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(2,), dense_units=4)
    with pytest.raises(kw.structure.StructureError, match="mode='norm' covers Dense chains only"):
        wp.certified_margins(cnn, np.zeros((2, 8, 8, 1), np.float32), y, 0.1, mode="norm")
    resnet = kw.architectures.small_resnet(input_shape=(8, 8, 1), channels=2, num_blocks=1)
    with pytest.raises(kw.structure.StructureError, match="merge layer 'block0_add' \\(Add\\).*residual"):
        wp.certified_margins(resnet, np.zeros((2, 8, 8, 1), np.float32), y, 0.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        wp.certified_margins(model, x, y, 0.1, mode="crown")
