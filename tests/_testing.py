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


def jitted_functions(function, seen=None):
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
            found.extend(jitted_functions(value, seen))
    return found


def compiled_count(function, jit_compile=True):
    """How many compiled programs sit behind a Keras train/test function: concrete functions of its
    `tf.function`s on TensorFlow, `jax.jit` cache entries on JAX. A test compares it before and after more steps
    to prove that nothing retraces; it fails if no compiled function is found (on JAX a model compiled with
    `jit_compile=False` runs its steps eagerly: nothing is traced, and the count is 0)."""
    if BACKEND == "jax":
        functions = jitted_functions(function)
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


def _project_l1(vectors, radius):
    """Euclidean projection of each row of `vectors` `(k, n)` onto the ℓ1 ball of `radius` `(k,)` (Duchi et al.
    2008: sort, threshold)."""
    import numpy as np

    magnitude = np.abs(vectors)
    ordered = -np.sort(-magnitude, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1)
    k = np.arange(1, vectors.shape[-1] + 1)
    count = np.maximum((ordered * k > cumulative - radius[:, None]).sum(axis=-1), 1)
    threshold = (cumulative[np.arange(len(vectors)), count - 1] - radius) / count
    projected = np.sign(vectors) * np.maximum(magnitude - threshold[:, None], 0.0)
    inside = magnitude.sum(axis=-1, keepdims=True) <= radius[:, None]
    return np.where(inside, vectors, projected)


def project_to_ball(matrices, radius, norm):
    """Projection of kernels `(B, fan_in, fan_out)` (`W = kernelᵀ`) onto `||W|| ≤ radius` (a number or one per
    kernel `(B,)`) in the operator norm `norm` ("2", "1", "inf"); NumPy float64 (the weight-space adversary of the
    certificate tests)."""
    import numpy as np

    matrices = np.asarray(matrices, np.float64)
    radius = np.broadcast_to(np.asarray(radius, np.float64), matrices.shape[:-2])
    if norm == "2":
        u, s, vt = np.linalg.svd(matrices, full_matrices=False)
        return np.einsum("bik,bk,bkj->bij", u, np.minimum(s, radius[:, None]), vt)
    # "inf": each output unit's incoming weights (a kernel column) in the ℓ1 ball; "1": each kernel row.
    vectors = np.swapaxes(matrices, -1, -2) if norm == "inf" else matrices
    shape = vectors.shape
    rows = _project_l1(vectors.reshape(-1, shape[-1]), np.broadcast_to(radius[:, None], shape[:-1]).reshape(-1))
    projected = rows.reshape(shape)
    return np.swapaxes(projected, -1, -2) if norm == "inf" else projected


def steepest_ascent_vertex(gradient, radius, norm):
    """`argmax_{||Δᵀ|| ≤ radius} ⟨gradient, Δ⟩` per kernel `(B, fan_in, fan_out)` (NumPy float64)."""
    import numpy as np

    gradient = np.asarray(gradient, np.float64)
    radius = np.broadcast_to(np.asarray(radius, np.float64), gradient.shape[:-2])[:, None, None]
    if norm == "2":
        u, _, vt = np.linalg.svd(gradient, full_matrices=False)
        return radius * u @ vt
    axis = -2 if norm == "inf" else -1
    index = np.expand_dims(np.argmax(np.abs(gradient), axis=axis), axis)
    mask = np.zeros_like(gradient)
    np.put_along_axis(mask, index, 1.0, axis=axis)
    return radius * mask * np.sign(gradient)


def free_ports(count):
    """`count` free TCP ports on 127.0.0.1 (for the multi-process tests)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def load_run(path):
    """`(weights, state, history)` from the `.npz` a multi-process check script wrote (`w<i>`, `s<i>`, `history`)."""
    import json

    import numpy as np

    with np.load(path) as archive:
        weights = [archive[n] for n in sorted((n for n in archive.files if n.startswith("w")), key=lambda n: int(n[1:]))]
        state = [archive[n] for n in sorted((n for n in archive.files if n.startswith("s")), key=lambda n: int(n[1:]))]
        return weights, state, json.loads(str(archive["history"]))
