"""No silent partial coverage: weight decay covers every kernel a user expects (recurrent kernels, embedding tables,
attention projections, depthwise kernels), and the structural penalties name the kernels they leave out, and why."""

import warnings

import keras
import numpy as np
import pytest

import keras_wssi as kw

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def lstm_model():
    inputs = keras.Input((5, 3))
    x = keras.layers.LSTM(4, name="lstm")(inputs)
    return kw.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def embedding_model():
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 4, name="embedding")(inputs)
    x = keras.layers.Flatten()(x)
    return kw.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def attention_model():
    inputs = keras.Input((5, 4))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="attention")(inputs, inputs)
    x = keras.layers.Flatten()(x)
    return kw.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def depthwise_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    x = keras.layers.Flatten()(x)
    return kw.Model(inputs, keras.layers.Dense(3, name="logits")(x))


MODELS = {"lstm": lstm_model, "embedding": embedding_model, "attention": attention_model, "depthwise": depthwise_model}
# The kernels outside Dense/convolution layers that each model has (by a substring of their path).
EXPECTED_OTHERS = {"lstm": ["lstm"], "embedding": ["embedding"], "attention": ["attention"], "depthwise": []}


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_decay_covers_every_kernel_by_brute_force(name):
    model = MODELS[name]()
    model.compile("sgd", LOSS, regularizers=["l2:1.0"])
    penalty = model.penalties[0]
    kernels = [v for v in model.trainable_variables if len(v.shape) >= 2]
    expected = sum(float(np.sum(np.square(v.numpy()))) for v in kernels)
    got = float(penalty(kw.penalties.PenaltyContext(model, None, None, None, None, True)))
    assert got == pytest.approx(expected, rel=1e-5)
    assert sorted(penalty.coverage["regularized"]) == sorted(v.path for v in kernels)
    biases = [v.path for v in model.trainable_variables if len(v.shape) < 2]
    assert sorted(penalty.coverage["left_out"]) == sorted(biases)
    assert all("not decayed" in reason for reason in penalty.coverage["left_out"].values())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("penalty", ["layerwise_spectral_norm", "weissi"])
def test_structural_penalties_name_the_kernels_they_leave_out(name, penalty):
    model = MODELS[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile("sgd", LOSS, regularizers=[penalty])
    messages = [str(w.message) for w in caught if "leave" in str(w.message)]
    others = kw.structure.other_kernels(model)
    assert all(any(fragment in v.path for fragment in EXPECTED_OTHERS[name]) for v in others), [v.path for v in others]
    if EXPECTED_OTHERS[name]:
        assert others, name
        assert len(messages) == 1, messages
        for variable in others:
            assert variable.path in messages[0]
        assert "Dense and convolution" in messages[0] and "l2" in messages[0]
    else:
        # DepthwiseConv2D is a weight layer: covered, so nothing is left out and nothing is said.
        assert not others and not messages, messages
