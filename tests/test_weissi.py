"""WEISSI penalties: invariance under the scale shift, NumPy formulas, gradients, guards and exclusions."""

import math
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from keras_wssi import backend
from keras_wssi.analysis import scale_shift
from keras_wssi.penalties import WEISSI
from keras_wssi.penalties import WeightDecay


def _tiny_models():
    return {
        "mlp": kw.architectures.mlp(input_shape=(6, 6, 1), hidden_units=(16, 12)),
        "cnn": kw.architectures.small_cnn(input_shape=(8, 8, 1), filters=(3, 4), dense_units=8),
        "resnet": kw.architectures.small_resnet(input_shape=(8, 8, 1), channels=3, num_blocks=2),
    }


def _valid_factors(model, rng):
    """Random positive factors whose product along every path is 1 (branch products 1 inside blocks)."""
    layers = kw.structure.weight_layers(model)
    blocks = kw.structure.residual_blocks(model)
    in_block = {w.name: b for b in blocks for w in b.weight_layers}
    factors = {}
    for block in blocks:
        for branch in block.branches:
            values = np.exp(rng.normal(size=len(branch)))
            if len(branch):
                values[-1] = 1.0 / np.prod(values[:-1])
            factors.update({w.name: float(v) for w, v in zip(branch, values)})
    chain = [w.name for w in layers if w.name not in in_block]
    values = np.exp(rng.normal(size=len(chain)))
    values[-1] = 1.0 / np.prod(values[:-1])
    factors.update({name: float(v) for name, v in zip(chain, values)})
    return factors


def _value_and_gradients(penalty, context, variables):
    """The penalty's value and its gradients with respect to `variables`, on the active backend (the variables
    are read through a stateless scope, so the gradients are taken with respect to their values)."""

    def value_at(*values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return penalty(context)

    value, pullback = backend.vjp(value_at, *[v.value for v in variables])
    return value, pullback(ops.ones_like(value))


def _value(penalty, model):
    penalty = WEISSI.from_config(penalty.get_config())  # Fresh state, built on this model.
    penalty.build(model)
    return float(penalty(kw.penalties.PenaltyContext(model, None, None, None, None, True)))


FORMS_AND_NORMS = [
    ("log_product", "frobenius"),
    ("product", "frobenius"),
    ("geometric_mean", "frobenius"),
    ("log_product", 1.0),
    ("log_product", 3.0),
    ("product", "spectral"),
    ("log_product", "spectral"),
]


@pytest.mark.parametrize("architecture", ["mlp", "cnn", "resnet"])
def test_scale_shift_keeps_logits_and_every_weissi_form_but_not_weight_decay(architecture):
    rng = np.random.default_rng(0)
    model = _tiny_models()[architecture]
    x = np.random.default_rng(1).random((8, *model.input_shape[1:])).astype("float32")
    factors = _valid_factors(model, rng)
    shifted = scale_shift(model, factors)
    logits, shifted_logits = model.predict(x, verbose=0), shifted.predict(x, verbose=0)
    np.testing.assert_allclose(shifted_logits, logits, atol=1e-5 * max(1.0, np.abs(logits).max()))

    for form, norm in FORMS_AND_NORMS:
        if form == "geometric_mean" and architecture == "resnet":
            continue  # The geometric mean has no residual form; the plain one is not invariant on a ResNet.
        # Many power-iteration rounds so the spectral value is converged, not start-vector dependent.
        penalty = WEISSI(1.0, form=form, norm=norm, power_iterations=200)
        before, after = _value(penalty, model), _value(penalty, shifted)
        assert math.isclose(before, after, rel_tol=1e-5, abs_tol=1e-5), (form, norm, before, after)

    decay = WeightDecay(1.0, p=2)
    decay.build(model)
    shifted_decay = WeightDecay(1.0, p=2)
    shifted_decay.build(shifted)
    context = kw.penalties.PenaltyContext(model, None, None, None, None, True)
    assert abs(float(decay(context)) - float(shifted_decay(context))) > 1e-2 * float(decay(context))


def test_values_match_numpy_formulas():
    model = _tiny_models()["mlp"]
    kernels = [w.kernels[0].numpy().astype(np.float64) for w in kw.structure.weight_layers(model)]
    frobenius = np.array([np.linalg.norm(k) for k in kernels])
    spectral = np.array([np.linalg.norm(k, 2) for k in kernels])
    count = len(kernels)
    expected = {
        ("log_product", "frobenius"): np.sum(np.log(frobenius)),
        ("product", "frobenius"): np.prod(frobenius),
        ("geometric_mean", "frobenius"): count * np.prod(frobenius**2) ** (1.0 / count),
        ("log_product", "spectral"): np.sum(np.log(spectral)),
        ("log_product", 1.0): np.sum(np.log([np.abs(k).sum() for k in kernels])),
        ("log_product", 3.0): np.sum(np.log([(np.abs(k) ** 3).sum() ** (1 / 3) for k in kernels])),
    }
    for (form, norm), value in expected.items():
        got = _value(WEISSI(1.0, form=form, norm=norm, power_iterations=300), model)
        np.testing.assert_allclose(got, value, rtol=1e-4, err_msg=f"{form}/{norm}")
    direction = np.sum([np.abs(k).sum() / np.linalg.norm(k) for k in kernels])
    got = _value(WEISSI(1.0, direction_weight=0.5), model)
    np.testing.assert_allclose(got, expected[("log_product", "frobenius")] + 0.5 * direction, rtol=1e-5)
    decay = WeightDecay(1.0, p=3.0)
    decay.build(model)
    got = float(decay(kw.penalties.PenaltyContext(model, None, None, None, None, True)))
    np.testing.assert_allclose(got, np.sum([(np.abs(k) ** 3).sum() for k in kernels]), rtol=1e-5)


def test_weight_decay_lower_bound_over_the_orbit_is_geometric_mean():
    """AM–GM: weight decay over the shift orbit is minimised at L (∏||W||²)^{1/L}, reached by balancing."""
    model = _tiny_models()["mlp"]
    norms = np.array([np.linalg.norm(w.kernels[0].numpy()) for w in kw.structure.weight_layers(model)])
    geometric = np.prod(norms) ** (1.0 / len(norms))
    balanced = scale_shift(model, [float(geometric / n) for n in norms])
    decay = WeightDecay(1.0)
    decay.build(balanced)
    value = float(decay(kw.penalties.PenaltyContext(balanced, None, None, None, None, True)))
    expected = _value(WEISSI(1.0, form="geometric_mean"), model)
    np.testing.assert_allclose(value, expected, rtol=1e-4)


def test_residual_form_matches_its_formula():
    model = _tiny_models()["resnet"]
    norm = {w.name: np.linalg.norm(w.kernels[0].numpy().astype(np.float64)) for w in kw.structure.weight_layers(model)}
    expected = np.log(norm["stem"]) + np.log(norm["logits"])
    for block in range(2):
        expected += np.log(1.0 + norm[f"block{block}_conv_a"] * norm[f"block{block}_conv_b"])
    np.testing.assert_allclose(_value(WEISSI(1.0), model), expected, rtol=1e-5)
    plain = sum(np.log(v) for v in norm.values())
    np.testing.assert_allclose(_value(WEISSI(1.0, residual=False), model), plain, rtol=1e-5)


@pytest.mark.parametrize(
    "penalty",
    [
        WEISSI(1.0),
        WEISSI(1.0, form="product"),
        WEISSI(1.0, form="geometric_mean"),
        WEISSI(1.0, norm=3.0, direction_weight=0.3),
        WeightDecay(1.0, p=2),
        WeightDecay(1.0, p=1.5),
    ],
    ids=lambda p: p.name + "_" + str(p.get_config().get("norm", p.get_config().get("p"))),
)
def test_gradient_matches_finite_differences(penalty):
    model = _tiny_models()["cnn"]
    penalty = type(penalty).from_config(penalty.get_config())
    penalty.build(model)
    variables = [k for w in kw.structure.weight_layers(model) for k in w.kernels]
    rng = np.random.default_rng(3)
    # Multiplicative directions w ⊙ n keep every entry's sign for small steps, so the L1 parts (|w|) are
    # differentiable along them and the central difference is exact up to O(step²).
    directions = [(v.numpy() * rng.normal(size=v.shape)).astype(np.float32) for v in variables]
    context = kw.penalties.PenaltyContext(model, None, None, None, None, True)
    _, gradients = _value_and_gradients(penalty, context, variables)
    analytic = sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(gradients, directions))
    originals = [v.numpy() for v in variables]
    step = 1e-3

    def at(t):
        for v, o, d in zip(variables, originals, directions):
            v.assign(o + t * d)
        return float(penalty(context))

    numeric = (at(step) - at(-step)) / (2 * step)
    at(0.0)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("norm", ["frobenius", "spectral", 1.0, 2.5])
@pytest.mark.parametrize("form", ["log_product", "product", "geometric_mean"])
def test_zero_kernel_gives_finite_value_and_gradient(form, norm):
    model = _tiny_models()["mlp"]
    first = kw.structure.weight_layers(model)[0].kernels[0]
    first.assign(np.zeros(first.shape, "float32"))
    penalty = WEISSI(1.0, form=form, norm=norm, direction_weight=0.1)
    penalty.build(model)
    context = kw.penalties.PenaltyContext(model, None, None, None, None, True)
    value, gradients = _value_and_gradients(penalty, context, model.trainable_variables)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in gradients if g is not None)


def test_normalized_kernels_are_excluded_and_reported():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(6, name="before_bn")(inputs)
    hidden = keras.layers.Activation("relu")(hidden)
    hidden = keras.layers.BatchNormalization()(hidden)
    outputs = keras.layers.Dense(3, name="head")(hidden)
    model = kw.Model(inputs, outputs)
    penalty = WEISSI(1.0)
    with pytest.warns(UserWarning, match="before_bn"):
        penalty.build(model)
    head = np.linalg.norm(model.get_layer("head").kernel.numpy())
    value = float(penalty(kw.penalties.PenaltyContext(model, None, None, None, None, True)))
    np.testing.assert_allclose(value, np.log(head), rtol=1e-5)
    kept = WEISSI(1.0, exclude_normalized=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept.build(model)
    assert len(kept._kernels) == 2


def test_non_homogeneous_model_warns():
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(4, activation="tanh", name="tanh_layer")(inputs))
    with pytest.warns(UserWarning, match="tanh_layer"):
        WEISSI(1.0).build(kw.Model(inputs, outputs))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"strength": -1.0}, ValueError),
        ({"strength": float("nan")}, ValueError),
        ({"strength": "big"}, TypeError),
        ({"form": "sum"}, ValueError),
        ({"norm": "nuclear"}, ValueError),
        ({"norm": 0.5}, ValueError),
        ({"residual": "yes"}, ValueError),
        ({"residual": True, "form": "geometric_mean"}, ValueError),
        ({"epsilon": 0.0}, ValueError),
        ({"power_iterations": 0}, ValueError),
        ({"direction_weight": -0.1}, ValueError),
        ({"name": "has space"}, ValueError),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error):
    with pytest.raises(error):
        WEISSI(**kwargs)


def test_model_without_weight_layers_is_refused():
    inputs = keras.Input((4,))
    model = kw.Model(inputs, keras.layers.ReLU()(inputs))
    with pytest.raises(kw.structure.StructureError, match="no weight layers"):
        WEISSI(1.0).build(model)
