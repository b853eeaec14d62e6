"""The per-class warm start of the Jacobian spectral-norm penalty (`start="warm"`): exact from the right vector,
state updated by training steps only, closer than a random start on a trained MNIST model, and bad settings."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_wssi as kw
from keras_wssi import penalties as P

from test_jacobian_linalg import brute_force_jacobian
from test_jacobian_linalg import relu_mlp
from test_jacobian_penalties import evaluate


def test_start_from_the_top_singular_vector_is_exact_and_unseen_classes_use_the_fallback():
    model = relu_mlp(hidden=(16, 16), classes=5)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1, 6)), np.zeros(1, "int64")
    jacobian = brute_force_jacobian(model, x)[0]
    left, singular, _ = np.linalg.svd(jacobian)
    top = left[:, 0]
    predicted = int(np.argmax(ops.convert_to_numpy(model(x.astype(model.inputs[0].dtype)))))

    penalty = P.JacobianSpectralNorm(method="power_iteration", iterations=1, start="warm", seed=3)
    penalty.build(model)
    # Before any training step, each predicted class starts from its own fixed random unit vector.
    logits = ops.convert_to_tensor(rng.normal(size=(8, 5)), "float32")
    start = ops.convert_to_numpy(penalty._warm_start_vectors(logits))
    initial = penalty._warm_initial
    assert not np.any(penalty._warm_state.numpy())  # Nothing seen yet.
    np.testing.assert_allclose(start, initial[np.argmax(ops.convert_to_numpy(logits), axis=-1)])
    np.testing.assert_allclose(np.linalg.norm(initial, axis=-1), 1.0, rtol=1e-6)
    # Reproducible without a seed (runs and replicas agree), different with another seed.
    same, zero, other = (P.JacobianSpectralNorm(start="warm", seed=s) for s in (None, 0, 1))
    for p in (same, zero, other):
        p.build(model)
    np.testing.assert_array_equal(same._warm_initial, zero._warm_initial)
    assert not np.allclose(other._warm_initial, same._warm_initial)
    # With v_c = u for the example's predicted class, one power step from u gives σ_max² exactly.
    state = np.zeros_like(initial)
    state[predicted] = top
    penalty._warm_state.assign(state)
    np.testing.assert_allclose(evaluate(model, penalty, x, y), singular[0] ** 2, rtol=1e-5)


def test_update_averages_sign_aligned_vectors_per_predicted_class():
    penalty = P.JacobianSpectralNorm(method="lanczos", iterations=1, start="warm", warm_decay=0.5)
    penalty.build(relu_mlp(hidden=(4,), classes=3))
    u = np.array([0.6, 0.8, 0.0], np.float32)
    logits = ops.convert_to_tensor([[5.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # Predicted classes 0, 0, 1.
    vectors = ops.convert_to_tensor(np.stack([u, -u, [0.0, 0.0, 1.0]]), "float32")  # ±u for class 0.
    penalty._update_warm_state(logits, vectors)
    state = penalty._warm_state.numpy()
    # First sighting: the signed class mean itself (±u, either sign), then a decayed blend.
    np.testing.assert_allclose(np.abs(state[0] @ u), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.abs(state[1][2]), 1.0, rtol=1e-6)
    assert not np.any(state[2])  # Class 2 was never predicted: still unseen.
    w = np.array([0.0, 0.6, 0.8], np.float32)
    penalty._update_warm_state(ops.convert_to_tensor([[5.0, 0.0, 0.0]]), ops.convert_to_tensor([w]))
    blended = 0.5 * state[0] + 0.5 * w * np.sign(state[0] @ w)
    np.testing.assert_allclose(penalty._warm_state.numpy()[0], blended / np.linalg.norm(blended), rtol=1e-5)
    assert not np.any(penalty._warm_state.numpy()[2])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_state_is_updated_by_training_steps_only(jit_compile):
    model = relu_mlp(dtype="float32", hidden=(16, 16), classes=3)
    penalty = P.JacobianSpectralNorm(0.01, method="lanczos", iterations=1, start="warm", warm_decay=0.5)
    model.compile(
        keras.optimizers.SGD(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        regularizers=[penalty, penalty.error_monitor()],
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    state = penalty._warm_state.numpy()
    seen = np.any(state != 0.0, axis=-1)
    assert seen.sum() >= 1  # At least one class was predicted and updated...
    np.testing.assert_allclose(np.linalg.norm(state[seen], axis=-1), 1.0, rtol=1e-5)  # ...to a unit vector.
    errors = history.history["jacobian_spectral_norm_error"]
    assert all(-1e-4 <= e < 0.5 for e in errors), errors
    # Evaluation (which also computes the penalty) leaves the state alone.
    model.evaluate(x, y, verbose=0)
    np.testing.assert_array_equal(penalty._warm_state.numpy(), state)
    config = penalty.get_config()
    assert config["start"] == "warm" and config["warm_decay"] == 0.5
    assert kw.penalties.deserialize(kw.penalties.serialize(penalty)).get_config() == config


def test_subclassed_model_creates_the_state_in_its_first_step():
    class Classifier(kw.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.out = keras.layers.Dense(4)

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    model = Classifier()
    penalty = P.JacobianSpectralNorm(0.01, method="lanczos", iterations=2, start="warm")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=[penalty],
                  jit_compile=True)
    rng = np.random.default_rng(2)
    model.fit(rng.normal(size=(32, 5)).astype("float32"), rng.integers(0, 4, 32), batch_size=8, epochs=1, verbose=0)
    assert penalty._warm_state.shape == (4, 4)
    assert np.any(penalty._warm_state.numpy() != 0.0)


def test_warm_start_beats_a_random_start_on_a_trained_mnist_model(data_dir):
    # The claim behind the option: within a predicted class, examples share much of the top left singular vector
    # of the logit Jacobian, so the running class average starts the Krylov iteration closer than a random vector.
    images, labels = kw.data.load_arrays("mnist", "train", data_dir=data_dir)
    images, labels = np.asarray(images[:12000]), np.asarray(labels[:12000])
    keras.utils.set_random_seed(0)
    model = kw.architectures.mlp(hidden_units=(128, 128))
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    model.fit(images[:10000], labels[:10000], batch_size=128, epochs=2, verbose=0)
    held_out, held_out_labels = images[10000:10512], labels[10000:10512]
    errors = {}
    for start in ("warm", "random", "loss_gradient"):
        penalty = P.JacobianSpectralNorm(method="lanczos", iterations=1, start=start, seed=0)
        estimate, exact = kw.analysis.jacobian_spectral_norm_estimates(model, held_out, held_out_labels, penalty)
        relative = (exact - estimate) / exact
        assert relative.min() > -1e-4  # A Rayleigh quotient: never above σ_max.
        errors[start] = float(relative.mean())
    assert errors["warm"] < 0.5 * errors["random"], errors
    assert errors["warm"] < errors["loss_gradient"], errors


def test_bad_warm_decay_is_named():
    for bad in (-0.1, 1.0, 1.5, float("nan"), True, "0.9", None):
        with pytest.raises(ValueError, match="warm_decay"):
            P.JacobianSpectralNorm(start="warm", warm_decay=bad)
    with pytest.raises(ValueError, match="start"):
        P.JacobianSpectralNorm(start="previous")
