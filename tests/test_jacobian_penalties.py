"""Jacobian penalties (input gradient, Frobenius, spectral, cross-Lipschitz, layer-wise bound) against brute force,
finite differences, in training (XLA on and off), through serialization, and on bad input."""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from keras_wssi import backend
from keras_wssi import penalties as P
from keras_wssi.penalties.base import PenaltyContext

from _testing import BACKEND
from test_jacobian_linalg import FLOAT
from test_jacobian_linalg import brute_force_jacobian
from test_jacobian_linalg import relu_cnn
from test_jacobian_linalg import relu_mlp
from test_jacobian_linalg import tolerance

if BACKEND == "tensorflow":
    import tensorflow as tf

# Compiled JAX steps of `jax_step`, one per (model, penalty, computation, gradient or not); each entry keeps its
# objects alive, so that their ids are not reused by later tests' objects.
_JAX_STEPS = {}


def jax_step(model, penalty, x, y, compute=None, with_gradient=False):
    """On JAX: `compute(context)` (default: the penalty's value) on one batch as in a compiled training step (a
    jitted function of the weights and the penalty's state, the input Jacobian from the step's own forward pass),
    the penalty's state updates written back; with `with_gradient`, also the gradients of the value with respect
    to the trainable weights (`None` where unconnected, as a tape gives)."""
    import jax

    compute = compute or penalty
    trainable = list(model.trainable_variables)
    state = list(penalty.variables) + list(model.non_trainable_variables)
    key = (id(model), id(penalty), id(compute), with_gradient)
    if key not in _JAX_STEPS:

        def step(weights, state_values, xt, yt):
            mapping = list(zip(trainable, weights)) + list(zip(state, state_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                xt, logits, jacobian = backend.forward_with_input_jacobian(model, xt, False)
                value = compute(PenaltyContext(model, xt, yt, None, logits, False, input_jacobian=jacobian))
            return value, [scope.get_current_value(v) for v in state]

        compiled = jax.jit(jax.value_and_grad(step, has_aux=True) if with_gradient else step)
        _JAX_STEPS[key] = (compiled, (model, penalty, compute))
    result = _JAX_STEPS[key][0]([v.value for v in trainable], [v.value for v in state], ops.convert_to_tensor(x),
                             ops.convert_to_tensor(y))
    if with_gradient:
        (value, new_state), gradients = result
        # A weight the value does not read gets a zero gradient from JAX; a tape gives None.
        gradients = [g if np.any(np.asarray(g)) else None for g in gradients]
    else:
        value, new_state = result
        gradients = None
    for variable, new in zip(state, new_state):
        variable.assign(new)
    return np.asarray(value), gradients


def evaluate(model, penalty, x, y, with_gradient=False):
    """The penalty's value on one batch through a PenaltyContext (as the training loop builds it)."""
    if not penalty.built:
        penalty.build(model)
    if BACKEND == "jax":
        value, gradients = jax_step(model, penalty, x, y, with_gradient=with_gradient)
        return (value, gradients) if with_gradient else value

    # In a tf.function, as in training (TensorFlow's eager second derivative of conv2d fails on the JVP).
    @tf.function
    def value_and_gradient(xt, yt):
        with tf.GradientTape() as weights_tape:
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch(xt)
                logits = model(xt, training=False)
            value = penalty(PenaltyContext(model, xt, yt, None, logits, False, input_tape=tape))
        return value, weights_tape.gradient(value, model.trainable_weights)

    value, gradients = value_and_gradient(tf.constant(x), tf.constant(y))
    if with_gradient:
        return value.numpy(), gradients
    return value.numpy()


def reference_values(model, x, y):
    jac = brute_force_jacobian(model, x).reshape(len(x), model.output_shape[-1], -1)
    classes = jac.shape[1]
    logits = ops.convert_to_numpy(model(x.astype(FLOAT), training=False)).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = np.einsum("bc,bcd->bd", p - np.eye(classes)[y], jac)
    pairwise = sum(np.sum((jac[:, l] - jac[:, m]) ** 2, -1) for l in range(classes) for m in range(classes))
    sigma = np.linalg.svd(jac, compute_uv=False)[:, 0]
    return {
        "input_gradient": np.mean(np.sum(grad**2, -1)),
        "frobenius": np.mean(0.5 * np.sum(jac**2, axis=(1, 2))),
        "cross_lipschitz": np.mean(pairwise) / classes**2,
        "sigma_squared": np.mean(sigma**2),
        "sigma": np.mean(sigma),
    }


@pytest.fixture(params=["mlp", "cnn"])
def problem(request):
    model = relu_mlp(classes=5) if request.param == "mlp" else relu_cnn(classes=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, *model.input_shape[1:])).astype(FLOAT)
    y = rng.integers(0, model.output_shape[-1], size=6)
    return model, x, y


def test_values_match_brute_force(problem):
    model, x, y = problem
    ref = reference_values(model, x, y)
    classes = model.output_shape[-1]
    cases = [
        (P.InputGradient(), ref["input_gradient"]),
        (P.InputGradient(loss="compiled"), None),
        (P.JacobianFrobenius(num_projections=-1), ref["frobenius"]),
        (P.CrossLipschitz(), ref["cross_lipschitz"]),
        (P.JacobianSpectralNorm(method="exact"), ref["sigma_squared"]),
        (P.JacobianSpectralNorm(method="exact", squared=False), ref["sigma"]),
        (P.JacobianSpectralNorm(method="lanczos", iterations=classes - 1), ref["sigma_squared"]),
    ]
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cases[1] = (cases[1][0], ref["input_gradient"])
    for penalty, expected in cases:
        np.testing.assert_allclose(evaluate(model, penalty, x, y), expected, rtol=2e-4, err_msg=repr(penalty))


def test_spectral_default_is_within_a_percent_on_a_converged_problem():
    model = relu_mlp(hidden=(64, 64), classes=10, input_shape=(20,))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 20)).astype(FLOAT), rng.integers(0, 10, size=64)
    estimate, exact = kw.analysis.jacobian_spectral_norm_estimates(model, x, y, P.JacobianSpectralNorm(seed=0))
    relative = (exact - estimate) / exact
    assert np.mean(relative) < 1e-2 and np.min(relative) > -tolerance(1e-5, 1e-4)
    # Converged settings: 1e-3 relative.
    estimate, exact = kw.analysis.jacobian_spectral_norm_estimates(
        model, x, y, P.JacobianSpectralNorm(method="lanczos", iterations=9, seed=0)
    )
    np.testing.assert_allclose(estimate, exact, rtol=1e-3)
    estimate, exact = kw.analysis.jacobian_spectral_norm_estimates(model, x, y, P.JacobianSpectralNorm(method="exact"))
    np.testing.assert_allclose(estimate, exact, rtol=tolerance(1e-5, 1e-4))


@pytest.mark.parametrize("penalty_class,centered", [(P.JacobianFrobenius, False), (P.CrossLipschitz, True)])
def test_random_projection_estimators_are_unbiased(penalty_class, centered):
    model = relu_mlp(classes=5, dtype="float32")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.integers(0, 5, size=8)
    exact = evaluate(model, penalty_class(num_projections=-1), x, y)
    penalty = penalty_class(num_projections=1, seed=3)
    penalty.build(model)

    def fifty(context):
        return ops.stack([penalty(context) for _ in range(50)])

    if BACKEND == "jax":
        draws = lambda: jax_step(model, penalty, x, y, compute=fifty)[0]  # noqa: E731
    else:
        xt = tf.constant(x)

        @tf.function
        def draws():
            with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
                tape.watch(xt)
                logits = model(xt, training=False)
            return fifty(PenaltyContext(model, xt, tf.constant(y), None, logits, False, input_tape=tape))

    samples = np.concatenate([np.asarray(draws()) for _ in range(60)])  # 3000 draws of an 8-example batch mean
    assert abs(samples.mean() / exact - 1.0) < 0.02, (samples.mean(), exact)
    assert samples.std() > 0  # The estimate does vary: the draws are new every call.


def _directional_derivative_check(model, penalty, x, y, step=1e-4, rtol=2e-2):
    value, gradients = evaluate(model, penalty, x, y, with_gradient=True)
    rng = np.random.default_rng(4)
    directions = [rng.normal(size=w.shape) for w in model.trainable_weights]
    analytic = sum(np.sum(ops.convert_to_numpy(g) * d) for g, d in zip(gradients, directions) if g is not None)
    originals = [w.numpy() for w in model.trainable_weights]

    def at(t):
        for w, o, d in zip(model.trainable_weights, originals, directions):
            w.assign(o + t * d)
        return float(evaluate(model, penalty, x, y))

    numeric = (at(step) - at(-step)) / (2 * step)
    at(0.0)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, err_msg=repr(penalty))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: P.InputGradient(),
        lambda: P.InputGradient(p=1.5, power=1.0),
        lambda: P.JacobianFrobenius(num_projections=-1),
        lambda: P.CrossLipschitz(),
        lambda: P.JacobianSpectralNorm(method="exact"),
        lambda: P.JacobianSpectralNorm(method="lanczos", iterations=4, start="fixed", seed=0, squared=False),
        lambda: P.LayerwiseSpectralNorm(iterations=30),
    ],
)
def test_gradients_match_finite_differences(factory):
    model = relu_mlp(hidden=(10, 10), classes=5)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(5, 6)).astype(FLOAT), rng.integers(0, 5, size=5)
    _directional_derivative_check(model, factory(), x, y)


def test_layerwise_spectral_norm_matches_svd_and_operator_mode_matches_conv_matrix():
    model = relu_cnn(dtype="float32")
    penalty = P.LayerwiseSpectralNorm(iterations=100)
    value = evaluate(model, penalty, np.zeros((1, 6, 6, 2), "float32"), np.zeros(1, "int64"))
    sigmas = kw.analysis.layerwise_spectral_norms(model)
    np.testing.assert_allclose(value, 0.5 * sum(s**2 for s in sigmas.values()), rtol=1e-4)
    operator = P.LayerwiseSpectralNorm(iterations=300, conv_norm="operator")
    operator.build(model)
    norms = [float(s) for s in operator.layer_norms()]
    from test_jacobian_linalg import _conv_matrix

    conv = model.layers[1]
    expected = np.linalg.norm(_conv_matrix(conv.kernel.numpy().astype("float64"), (6, 6, 2), 1, "SAME"), ord=2)
    np.testing.assert_allclose(norms[0], expected, rtol=1e-3)
    conv2 = model.layers[3]
    expected2 = np.linalg.norm(_conv_matrix(conv2.kernel.numpy().astype("float64"), (3, 3, 3), 1, "VALID"), ord=2)
    np.testing.assert_allclose(norms[1], expected2, rtol=1e-3)


def test_layerwise_warm_start_converges_across_steps():
    model = relu_mlp(hidden=(20,), classes=5, dtype="float32")
    penalty = P.LayerwiseSpectralNorm(iterations=1)
    x, y = np.zeros((1, 6), "float32"), np.zeros(1, "int64")
    values = [evaluate(model, penalty, x, y) for _ in range(60)]
    expected = 0.5 * sum(s**2 for s in kw.analysis.layerwise_spectral_norms(model).values())
    assert values[0] < expected * (1 + 1e-5)
    np.testing.assert_allclose(values[-1], expected, rtol=1e-3)


ALL_PENALTIES = {
    "input_gradient": lambda: P.InputGradient(0.1),
    "jacobian_frobenius": lambda: P.JacobianFrobenius(0.01, seed=1),
    "jacobian_spectral_norm": lambda: [P.JacobianSpectralNorm(0.01, seed=1), P.JacobianSpectralNormError(seed=1)],
    "jacobian_spectral_norm_exact": lambda: P.JacobianSpectralNorm(0.01, method="exact", name="spectral_exact"),
    "layerwise_spectral_norm": lambda: P.LayerwiseSpectralNorm(0.01, conv_norm="operator"),
    "cross_lipschitz": lambda: P.CrossLipschitz(0.01, num_projections=2, seed=2),
}


def small_float32_cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    return kw.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_trains_logs_and_does_not_retrace(jit_compile):
    # Every penalty in one model: one trace per XLA setting keeps the test short.
    model = small_float32_cnn()
    penalties = [p for f in ALL_PENALTIES.values() for p in (f() if isinstance(f(), list) else [f()])]
    model.compile(
        keras.optimizers.SGD(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        regularizers=penalties,
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(6)
    x, y = rng.random((32, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 32)
    traces = []
    for penalty in penalties:
        # call() runs once per trace; a second epoch must not add any (nothing retraces per step).
        penalty.call = (lambda original: lambda context: traces.append(1) or original(context))(penalty.call)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    traces_after_two_epochs = len(traces)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # Keras's JAX trainer runs the step eagerly (op by op, nothing traced) when jit_compile=False: call() then runs
    # every step, so counting traces is only meaningful for a compiled step.
    if BACKEND == "tensorflow" or jit_compile:
        assert len(traces) == traces_after_two_epochs
        assert len(traces) <= 2 * len(penalties)
    for penalty in penalties:
        assert penalty.name in history.history
        assert np.all(np.isfinite(history.history[penalty.name]))
    assert np.all(np.isfinite(history.history["loss"]))
    errors = history.history["jacobian_spectral_norm_error"]
    assert all(-1e-4 <= e < 0.05 for e in errors), errors


def test_save_and_load_round_trip(tmp_path):
    model = small_float32_cnn()
    penalties = [factory() for factory in ALL_PENALTIES.values()]
    flat = [p for item in penalties for p in (item if isinstance(item, list) else [item])]
    flat.append(P.InputGradient(0.2, loss="compiled", p=1.0, power=1.0, name="ig_l1"))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=flat)
    model.fit(np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int64"), verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(p) for p in loaded.penalties] == [type(p) for p in flat]
    for original, restored in zip(flat, loaded.penalties):
        assert original.get_config() == restored.get_config()


@pytest.mark.parametrize("factory", [f for f in ALL_PENALTIES.values()])
def test_get_config_is_the_constructor_arguments(factory):
    items = factory()
    for penalty in items if isinstance(items, list) else [items]:
        config = penalty.get_config()
        assert type(penalty)(**config).get_config() == config
        assert kw.penalties.deserialize(kw.penalties.serialize(penalty)).get_config() == config


def test_registered_names_resolve():
    for name in ("input_gradient", "jacobian_frobenius", "jacobian_spectral_norm", "layerwise_spectral_norm",
                 "cross_lipschitz", "cure", "jacobian_spectral_norm_error"):
        assert kw.penalties.get(name).name == name
    assert kw.penalties.get("input_gradient:0.3").strength == 0.3


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="iterations"):
        P.JacobianSpectralNorm(iterations=0)
    with pytest.raises(ValueError, match="iterations"):
        P.LayerwiseSpectralNorm(iterations=0)
    with pytest.raises(ValueError, match="num_projections"):
        P.JacobianFrobenius(num_projections=0)
    with pytest.raises(ValueError, match="method"):
        P.JacobianSpectralNorm(method="svd")
    with pytest.raises(ValueError, match="loss"):
        P.InputGradient(loss="mse")
    with pytest.raises(ValueError, match="p must"):
        P.InputGradient(p=0.5)
    with pytest.raises(ValueError, match="strength"):
        P.JacobianSpectralNormError(strength=1.0)
    # Non-classifier output: one logit.
    inputs = keras.Input((4,))
    regression = kw.Model(inputs, keras.layers.Dense(1)(inputs))
    regression.compile("sgd", "mse", regularizers=[P.InputGradient(loss="compiled")])
    with pytest.raises(ValueError, match="at least 2 classes"):
        regression.fit(np.zeros((4, 4), "float32"), np.zeros((4, 1), "float32"), verbose=0)
    # Non-classifier output: rank 3.
    inputs = keras.Input((3, 4))
    sequence = kw.Model(inputs, keras.layers.Dense(5)(inputs))
    sequence.compile("sgd", "mse", regularizers=[P.JacobianFrobenius()])
    with pytest.raises(ValueError, match=r"\(batch, num_classes\)"):
        sequence.fit(np.zeros((4, 3, 4), "float32"), np.zeros((4, 3, 5), "float32"), verbose=0)
    # Softmax output layer: a warning that penalties are defined on logits.
    inputs = keras.Input((4,))
    probabilities = kw.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Penalties are built (and check the model) at compile time, where their state is created.
        probabilities.compile("sgd", "sparse_categorical_crossentropy", regularizers=[P.InputGradient()])
        probabilities.fit(np.zeros((4, 4), "float32"), np.zeros(4, "int64"), verbose=0)
    assert any("logits" in str(w.message) for w in caught)
    # Integer inputs.
    inputs = keras.Input((4,), dtype="int32")
    integer = kw.Model(inputs, keras.layers.Dense(3)(keras.layers.Lambda(lambda t: ops.cast(t, "float32"))(inputs)))
    with pytest.raises(TypeError, match="floating point"):
        integer.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=[P.CrossLipschitz()])
        integer.fit(np.zeros((4, 4), "int32"), np.zeros(4, "int64"), verbose=0)


def _regularization(regularizer, kernel):
    """The regularizer's value as the training step computes it. On TensorFlow: called on the kernel variable, with
    the vector warm-started by the steps. On JAX, Keras's jitted step calls it on the kernel's value, where (by the
    regularizer's documented JAX behaviour) it computes σ to convergence instead of keeping a vector: so here too,
    inside a jitted function of the value (an eager call on the variable would start a new, cold vector)."""
    if BACKEND == "jax":
        import jax

        return float(jax.jit(regularizer)(kernel.value))
    return float(regularizer(kernel))


def test_spectral_norm_regularizer_under_xla_matches_svd_and_round_trips(tmp_path):
    regularizer = kw.regularizers.SpectralNormRegularizer(0.01)
    conv_regularizer = kw.regularizers.SpectralNormRegularizer(0.01, conv_input_shape=(8, 8, 1), iterations=2)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", kernel_regularizer=conv_regularizer)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", kernel_regularizer=regularizer)(x)
    model = kw.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(keras.optimizers.SGD(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    rng = np.random.default_rng(7)
    model.fit(rng.random((64, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 64), batch_size=8, epochs=5, verbose=0)
    dense_kernel = model.layers[3].kernel.numpy()
    expected = 0.005 * np.linalg.norm(dense_kernel, ord=2) ** 2
    np.testing.assert_allclose(_regularization(regularizer, model.layers[3].kernel), expected, rtol=1e-3)
    from test_jacobian_linalg import _conv_matrix

    conv_kernel = model.layers[1].kernel.numpy().astype("float64")
    expected_conv = 0.005 * np.linalg.norm(_conv_matrix(conv_kernel, (8, 8, 1), 1, "SAME"), ord=2) ** 2
    np.testing.assert_allclose(_regularization(conv_regularizer, model.layers[1].kernel), expected_conv, rtol=1e-3)
    path = os.path.join(tmp_path, "regularized.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[3].kernel_regularizer.get_config() == regularizer.get_config()
    assert loaded.layers[1].kernel_regularizer.get_config() == conv_regularizer.get_config()
    with pytest.raises(ValueError, match="iterations"):
        kw.regularizers.SpectralNormRegularizer(iterations=0)
