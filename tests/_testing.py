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
