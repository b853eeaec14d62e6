"""Accuracy under random and adversarial weight perturbations, as curves over the radius ε.

Tsai, Hsu, Yu, Chen, "Formalizing Generalization and Robustness of Neural Networks to Weight
Perturbations" (arXiv 2103.02200) evaluate networks with norm-bounded perturbations `||Δ_l|| ≤ ε_l` of the
kernels. This module measures it empirically:

- `kind="random"`: `Δ_l` with i.i.d. uniform (−1, 1) or standard Gaussian entries, rescaled onto the sphere
  `||Δ_l|| = ε_l`; the accuracy is averaged over `num_draws` draws (one draw is shared by the whole data set).
- `kind="adversarial"`: projected gradient ascent of the batch cross-entropy over `Δ`, per batch: `steps`
  steps `Δ ← Π(Δ + η · LMO(∇))` where LMO is the steepest-ascent vertex of the norm ball (the operator-norm
  analogue of FGSM's sign step) and Π the Euclidean projection onto the ball.

Norms are operator norms of `W = kernelᵀ` (convolution kernels reshaped to `(k·k·C_in, C_out)` matrices):
`"inf"` (max-row-ℓ1, the paper's; projection = ℓ1-ball projection of each output unit's weights),
`"1"` (max-column-ℓ1) and `"2"` (spectral; projection clips singular values). `ε_l = ε · ||W_l||` with
`relative=True`, else `ε`.

The model's variables are never written: perturbed weights enter through `model.stateless_call`, and a
snapshot taken before is compared (and restored, bit for bit) in a `finally` block.
"""

import numpy as np
import tensorflow as tf

from keras_wssi import labels as labels_module
from keras_wssi import structure
from keras_wssi.margin_bounds import operator_norm
from keras_wssi.margin_bounds import validate_epsilon
from keras_wssi.margin_bounds import validate_layers
from keras_wssi.margin_bounds import validate_weight_norm

__all__ = ["evaluate_weight_perturbations", "project_to_ball", "steepest_ascent_vertex"]

KINDS = ("random", "adversarial")
DISTRIBUTIONS = ("uniform", "gaussian")


def _matrix(kernel, kind):
    if kind not in ("dense", "conv"):
        raise structure.StructureError(
            f"Weight-perturbation evaluation supports Dense and convolution kernels, got a {kind} layer."
        )
    return tf.reshape(kernel, [-1, kernel.shape[-1]])


def _project_l1_rows(vectors, radius):
    """Euclidean projection of each row of `vectors` `(k, n)` onto the ℓ1 ball of `radius` `(k,)`
    (Duchi, Shalev-Shwartz, Singer, Chandra 2008: sort, threshold)."""
    magnitude = tf.abs(vectors)
    dimension = tf.shape(vectors)[-1]
    sorted_magnitude = tf.sort(magnitude, axis=-1, direction="DESCENDING")
    cumulative = tf.cumsum(sorted_magnitude, axis=-1)
    k = tf.cast(tf.range(1, dimension + 1), vectors.dtype)
    active = tf.cast(sorted_magnitude * k > cumulative - radius[:, None], tf.int32)
    count = tf.maximum(tf.reduce_sum(active, axis=-1), 1)
    threshold = (tf.gather(cumulative, count - 1, axis=-1, batch_dims=1) - radius) / tf.cast(count, vectors.dtype)
    projected = tf.sign(vectors) * tf.nn.relu(magnitude - threshold[:, None])
    inside = tf.reduce_sum(magnitude, axis=-1, keepdims=True) <= radius[:, None]
    return tf.where(inside, vectors, projected)


def _as_dtype(value, dtype):
    # tf.cast of a Python float goes through float32 first; build float64 radii directly.
    return tf.cast(value, dtype) if tf.is_tensor(value) else tf.constant(value, dtype)


def _vectors_along(matrix, axis):
    # The vectors whose ℓ1 norms the operator norm maximizes, as rows: columns (axis -2) or rows (axis -1).
    return tf.linalg.matrix_transpose(matrix) if axis == -2 else matrix


def project_to_ball(matrix, radius, norm="inf"):
    """Euclidean projection of kernel matrices `(…, fan_in, fan_out)` (`W = matrixᵀ`) onto
    `{Δ : ||Δᵀ|| ≤ radius}` for the operator norm `norm` (`"inf"`, `"1"`, `"2"`); `radius` is a scalar or
    one radius per matrix `(…)`."""
    norm = validate_weight_norm(norm)
    matrix = tf.convert_to_tensor(matrix)
    radius = tf.broadcast_to(_as_dtype(radius, matrix.dtype), tf.shape(matrix)[:-2])
    if norm == "2":
        s, u, v = tf.linalg.svd(matrix)
        return tf.matmul(u * tf.minimum(s, radius[..., None])[..., None, :], v, transpose_b=True)
    # "inf": every output unit's incoming weights (a column of the kernel) lie in the ℓ1 ball; "1": every row.
    axis = -2 if norm == "inf" else -1
    vectors = _vectors_along(matrix, axis)
    shape = tf.shape(vectors)
    rows = tf.reshape(vectors, [-1, shape[-1]])
    radii = tf.reshape(tf.broadcast_to(radius[..., None], shape[:-1]), [-1])
    projected = tf.reshape(_project_l1_rows(rows, radii), shape)
    return _vectors_along(projected, axis)


def steepest_ascent_vertex(gradient, radius, norm="inf"):
    """`argmax_{||Δᵀ|| ≤ radius} ⟨gradient, Δ⟩` per matrix `(…, fan_in, fan_out)` (the linear maximization
    oracle of the ball: the operator-norm analogue of FGSM's sign step)."""
    norm = validate_weight_norm(norm)
    gradient = tf.convert_to_tensor(gradient)
    radius = tf.broadcast_to(_as_dtype(radius, gradient.dtype), tf.shape(gradient)[:-2])[..., None, None]
    if norm == "2":
        _, u, v = tf.linalg.svd(gradient)  # argmax is the polar factor U Vᵀ (value: radius × nuclear norm)
        return radius * tf.matmul(u, v, transpose_b=True)
    axis = -2 if norm == "inf" else -1
    size = tf.shape(gradient)[axis]
    index = tf.argmax(tf.abs(gradient), axis=axis, output_type=tf.int32)
    mask = tf.one_hot(index, size, dtype=gradient.dtype, axis=gradient.shape.rank + axis)
    return radius * mask * tf.sign(gradient)


def _validated_epsilons(epsilons):
    if np.isscalar(epsilons):
        epsilons = [epsilons]
    try:
        epsilons = list(epsilons)
    except TypeError:
        raise TypeError(f"epsilons must be a number or a list of numbers, got {epsilons!r}.") from None
    epsilons = [validate_epsilon(e, "epsilons") for e in epsilons]
    if not epsilons:
        raise ValueError("epsilons must hold at least one radius.")
    return epsilons


def evaluate_weight_perturbations(
    model,
    images,
    labels,
    epsilons,
    kind="random",
    norm="inf",
    layers=None,
    per_layer=False,
    batch_size=256,
    seed=0,
    relative=True,
    distribution="uniform",
    num_draws=3,
    steps=10,
    step_size=None,
    jit_compile=False,
):
    """Accuracy of `model` on `(images, labels)` under weight perturbations, for every ε in `epsilons`.

    Args:
        model: a built Keras model whose weight layers are Dense or convolutions.
        images: inputs `(N, …)`; labels: integer labels `(N,)`.
        epsilons: radii ε ≥ 0 (a curve); a single number is accepted.
        kind: `"random"` or `"adversarial"` (projected gradient ascent of the loss, per batch).
        norm: the operator norm of the ball: `"inf"` (default), `"1"` or `"2"`.
        layers: names of the perturbed weight layers (None: all of them).
        per_layer: also return one curve per layer of `layers`, perturbing that layer alone.
        batch_size: examples per compiled batch.
        seed: seed of the random draws.
        relative: radius `ε · ||W_l||` (True) or `ε` (False).
        distribution: `"uniform"` or `"gaussian"` entries for `kind="random"`, rescaled onto the sphere.
        num_draws: random draws per ε (the mean accuracy is reported).
        steps: ascent steps for `kind="adversarial"`.
        step_size: η as a fraction of the radius per step (default `2.5 / steps`).
        jit_compile: compile the batch functions with XLA.

    Returns:
        `{"epsilons": [...], "accuracy": [...], "settings": {...}}`, plus `"accuracy_std"` over draws for
        random perturbations and `"per_layer": {name: [...]}` when `per_layer=True`.

    Example:

    ```python
    curve = evaluate_weight_perturbations(model, x_test, y_test, [0.0, 0.01, 0.05], kind="adversarial")
    ```
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    norm = validate_weight_norm(norm)
    epsilons = _validated_epsilons(epsilons)
    for argument, value in (("batch_size", batch_size), ("num_draws", num_draws), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive integer, got {value!r}.")
    if step_size is None:
        step_size = 2.5 / steps
    step_size = validate_epsilon(step_size, "step_size")
    images = np.asarray(images)
    labels = labels_module.class_indices(labels, None, "labels").astype(np.int32)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images and labels must be non-empty and of equal length, got {len(images)} and {len(labels)}.")

    weight_layers = structure.weight_layers(model)
    names = [w.name for w in weight_layers]
    chosen = validate_layers(layers, names)
    targets = [w for w in weight_layers if w.name in chosen]
    for w in targets:
        _matrix(w.kernels[0], w.kind)  # Raises for depthwise/separable kernels.

    trainable = list(model.trainable_variables)
    non_trainable = list(model.non_trainable_variables)
    snapshot = [np.array(v.numpy(), copy=True) for v in model.variables]
    try:
        position = {}
        for w in targets:
            kernel = w.kernels[0]
            matches = [i for i, v in enumerate(trainable) if v is kernel]
            if not matches:
                raise ValueError(f"layers: the kernel of {w.name!r} is not trainable; it cannot be perturbed here.")
            position[w.name] = matches[0]
        base_norms = {w.name: float(operator_norm(_matrix(w.kernels[0], w.kind), norm)) for w in targets}

        def perturbed_values(deltas, order):
            values = [tf.convert_to_tensor(v) for v in trainable]
            for name, delta in zip(order, deltas):
                index = position[name]
                values[index] = values[index] + tf.reshape(delta, values[index].shape)
            return values

        def logits_with(deltas, order, x):
            outputs, _ = model.stateless_call(
                perturbed_values(deltas, order), [tf.convert_to_tensor(v) for v in non_trainable], x, training=False
            )
            return tf.cast(outputs, tf.float32)

        def make_functions(order):
            @tf.function(jit_compile=jit_compile, reduce_retracing=True)
            def correct_count(deltas, x, y):
                logits = logits_with(deltas, order, x)
                return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.int32))

            @tf.function(jit_compile=jit_compile, reduce_retracing=True)
            def adversarial_correct_count(x, y, radii):
                deltas = [tf.zeros_like(_matrix(trainable[position[n]], "dense")) for n in order]
                for _ in range(steps):
                    with tf.GradientTape() as tape:
                        tape.watch(deltas)
                        logits = logits_with(deltas, order, x)
                        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
                    gradients = tape.gradient(loss, deltas)
                    deltas = [
                        project_to_ball(d + step_size * steepest_ascent_vertex(g, r, norm), r, norm)
                        for d, g, r in zip(deltas, gradients, tf.unstack(radii))
                    ]
                logits = logits_with(deltas, order, x)
                return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.int32))

            return correct_count, adversarial_correct_count

        def batches():
            for start in range(0, len(images), batch_size):
                yield (
                    tf.convert_to_tensor(images[start : start + batch_size], tf.float32),
                    tf.convert_to_tensor(labels[start : start + batch_size]),
                )

        rng = np.random.default_rng(seed)

        def curve(order):
            correct_count, adversarial_correct_count = make_functions(order)
            accuracies, stds = [], []
            for epsilon in epsilons:
                radii = [epsilon * base_norms[n] if relative else epsilon for n in order]
                if kind == "adversarial":
                    radius_tensor = tf.constant(radii, tf.float32)
                    total = sum(int(adversarial_correct_count(x, y, radius_tensor)) for x, y in batches())
                    accuracies.append(total / len(images))
                    stds.append(0.0)
                    continue
                draws = []
                for _ in range(num_draws):
                    deltas = []
                    for name, radius in zip(order, radii):
                        shape = _matrix(trainable[position[name]], "dense").shape
                        if distribution == "uniform":
                            raw = rng.uniform(-1.0, 1.0, size=shape)
                        else:
                            raw = rng.standard_normal(size=shape)
                        raw = tf.constant(raw, tf.float32)
                        scale = radius / max(float(operator_norm(raw, norm)), 1e-30)
                        deltas.append(raw * scale)
                    total = sum(int(correct_count(deltas, x, y)) for x, y in batches())
                    draws.append(total / len(images))
                accuracies.append(float(np.mean(draws)))
                stds.append(float(np.std(draws)))
            return accuracies, stds

        order = [w.name for w in targets]
        accuracy, accuracy_std = curve(order)
        result = {
            "epsilons": list(epsilons),
            "accuracy": accuracy,
            "settings": {
                "kind": kind,
                "norm": norm,
                "layers": order,
                "relative": bool(relative),
                "distribution": distribution if kind == "random" else None,
                "num_draws": num_draws if kind == "random" else None,
                "steps": steps if kind == "adversarial" else None,
                "step_size": step_size if kind == "adversarial" else None,
                "batch_size": batch_size,
                "seed": seed,
                "num_examples": int(len(images)),
                "layer_norms": base_norms,
            },
        }
        if kind == "random":
            result["accuracy_std"] = accuracy_std
        if per_layer:
            result["per_layer"] = {name: curve([name])[0] for name in order}
        return result
    finally:
        for variable, value in zip(model.variables, snapshot):
            if not np.array_equal(variable.numpy(), value):
                variable.assign(value)
