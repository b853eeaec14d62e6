"""Helpers shared by several test modules."""


def tf_functions(function):
    """The `tf.function`s behind a Keras train/test function (searched through its closures), so a test can
    count their concrete functions and prove that nothing retraces per step."""
    if hasattr(function, "_list_all_concrete_functions"):
        return [function]
    found = []
    for cell in getattr(function, "__closure__", None) or ():
        value = cell.cell_contents
        if hasattr(value, "_list_all_concrete_functions"):
            found.append(value)
        elif callable(value) and getattr(value, "__closure__", None):
            found.extend(tf_functions(value))
    return found


def _jitted_functions(function, seen=None):
    """The `jax.jit` functions behind a Keras JAX train/test function (searched through its closures)."""
    seen = set() if seen is None else seen
    if id(function) in seen:
        return []
    seen.add(id(function))
    if hasattr(function, "_cache_size"):
        return [function]
    found = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if callable(value):
            found.extend(_jitted_functions(value, seen))
    return found


def compiled_count(function, jit_compile=True):
    """How many compiled programs sit behind a Keras train/test function: concrete functions of its
    `tf.function`s on TensorFlow, `jax.jit` cache entries on JAX. A test compares it before and after more steps
    to prove that nothing retraces; it fails if no compiled function is found (on JAX a model compiled with
    `jit_compile=False` runs its steps eagerly: nothing is traced, and the count is 0)."""
    if BACKEND == "jax":
        functions = _jitted_functions(function)
        if not jit_compile and not functions:
            return 0
        assert functions, "expected the step to be a jax.jit function"
        return sum(f._cache_size() for f in functions)
    functions = tf_functions(function)
    assert functions, "expected the step to be a tf.function"
    return sum(len(f._list_all_concrete_functions()) for f in functions)


def small_trained_mlp(data_dir, examples):
    """A 784-64-10 MLP trained 2 epochs on 3,000 real MNIST images (seed 0), and the first `examples` test images
    and labels: the model the attack tests attack."""
    import keras
    import numpy as np

    from keras_wssi import architectures
    from keras_wssi import data

    keras.utils.set_random_seed(0)
    x_train, y_train = data.load_arrays("mnist", "train", data_dir)
    x_test, y_test = data.load_arrays("mnist", "test", data_dir)
    model = architectures.mlp(hidden_units=(64,))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train[:3000], y_train[:3000], epochs=2, batch_size=128, verbose=0)
    return model, np.array(x_test[:examples]), np.array(y_test[:examples])


BACKEND = __import__("keras").backend.backend()


def tensorflow_only(reason):
    """A mark that skips a test (or, as `pytestmark`, a module) on every backend but TensorFlow, with the reason."""
    import pytest

    return pytest.mark.skipif(BACKEND != "tensorflow", reason=f"TensorFlow backend only: {reason}")
