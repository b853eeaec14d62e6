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
from keras import ops
from keras.backend import standardize_dtype as keras_dtype

from keras_wssi import backend
from keras_wssi import labels as labels_module
from keras_wssi import structure
from keras_wssi.evaluation.compiled_attacks import compile_function
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
    return ops.reshape(kernel, (-1, kernel.shape[-1]))


def _kernel_matrix(layer):
    kernel = np.asarray(layer.kernels[0].numpy())
    _matrix(kernel, layer.kind)
    return kernel.reshape(-1, kernel.shape[-1])


def _operator_norm(matrix, norm):
    """`margin_bounds.operator_norm` of a kernel matrix `(fan_in, fan_out)` held in NumPy (a host-side float)."""
    matrix = np.asarray(matrix)
    if norm == "inf":
        return float(np.abs(matrix).sum(axis=0).max())
    if norm == "1":
        return float(np.abs(matrix).sum(axis=1).max())
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def _project_l1_rows(vectors, radius):
    """Euclidean projection of each row of `vectors` `(k, n)` onto the ℓ1 ball of `radius` `(k,)`
    (Duchi, Shalev-Shwartz, Singer, Chandra 2008: sort, threshold)."""
    dtype = vectors.dtype
    magnitude = ops.abs(vectors)
    dimension = vectors.shape[-1]
    sorted_magnitude = ops.flip(ops.sort(magnitude, axis=-1), axis=-1)
    cumulative = ops.cumsum(sorted_magnitude, axis=-1)
    k = ops.cast(ops.arange(1, dimension + 1), dtype)
    active = ops.cast(sorted_magnitude * k > cumulative - radius[:, None], "int32")
    count = ops.maximum(ops.sum(active, axis=-1), 1)
    threshold = (ops.take_along_axis(cumulative, (count - 1)[:, None], axis=-1)[:, 0] - radius) / ops.cast(count, dtype)
    projected = ops.sign(vectors) * ops.relu(magnitude - threshold[:, None])
    inside = ops.sum(magnitude, axis=-1, keepdims=True) <= radius[:, None]
    return ops.where(inside, vectors, projected)


def _as_dtype(value, dtype):
    # A Python float goes straight to the matrix's dtype (not through float32 first).
    if isinstance(value, (int, float, np.number, np.ndarray)):
        return ops.convert_to_tensor(np.asarray(value, dtype))
    return ops.cast(value, dtype)


def _vectors_along(matrix, axis):
    # The vectors whose ℓ1 norms the operator norm maximizes, as rows: columns (axis -2) or rows (axis -1).
    return ops.swapaxes(matrix, -1, -2) if axis == -2 else matrix


def _dtype(x):
    return keras_dtype(x.dtype)


def project_to_ball(matrix, radius, norm="inf"):
    """Euclidean projection of kernel matrices `(…, fan_in, fan_out)` (`W = matrixᵀ`) onto
    `{Δ : ||Δᵀ|| ≤ radius}` for the operator norm `norm` (`"inf"`, `"1"`, `"2"`); `radius` is a scalar or
    one radius per matrix `(…)`. Float64 matrices stay float64 (on JAX inside `jax.enable_x64`)."""
    norm = validate_weight_norm(norm)
    matrix = ops.convert_to_tensor(matrix)
    radius = ops.broadcast_to(_as_dtype(radius, _dtype(matrix)), tuple(matrix.shape[:-2]))
    if norm == "2":
        u, s, vh = ops.svd(matrix, full_matrices=False)
        return ops.matmul(u * ops.minimum(s, radius[..., None])[..., None, :], vh)
    # "inf": every output unit's incoming weights (a column of the kernel) lie in the ℓ1 ball; "1": every row.
    axis = -2 if norm == "inf" else -1
    vectors = _vectors_along(matrix, axis)
    shape = tuple(vectors.shape)
    rows = ops.reshape(vectors, (-1, shape[-1]))
    radii = ops.reshape(ops.broadcast_to(radius[..., None], shape[:-1]), (-1,))
    projected = ops.reshape(_project_l1_rows(rows, radii), shape)
    return _vectors_along(projected, axis)


def steepest_ascent_vertex(gradient, radius, norm="inf"):
    """`argmax_{||Δᵀ|| ≤ radius} ⟨gradient, Δ⟩` per matrix `(…, fan_in, fan_out)` (the linear maximization
    oracle of the ball: the operator-norm analogue of FGSM's sign step)."""
    norm = validate_weight_norm(norm)
    gradient = ops.convert_to_tensor(gradient)
    dtype = _dtype(gradient)
    radius = ops.broadcast_to(_as_dtype(radius, dtype), tuple(gradient.shape[:-2]))[..., None, None]
    if norm == "2":
        u, _, vh = ops.svd(gradient, full_matrices=False)  # argmax is the polar factor U Vᵀ (radius × nuclear norm)
        return radius * ops.matmul(u, vh)
    axis = -2 if norm == "inf" else -1
    size = gradient.shape[axis]
    index = ops.argmax(ops.abs(gradient), axis=axis)
    mask = ops.one_hot(index, size, axis=len(gradient.shape) + axis, dtype=dtype)
    return radius * mask * ops.sign(gradient)


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
        base_norms = {w.name: _operator_norm(_kernel_matrix(w), norm) for w in targets}

        def perturbed_values(deltas, order):
            values = [ops.convert_to_tensor(v) for v in trainable]
            for name, delta in zip(order, deltas):
                index = position[name]
                values[index] = values[index] + ops.reshape(delta, values[index].shape)
            return values

        def logits_with(deltas, order, x):
            outputs, _ = model.stateless_call(
                perturbed_values(deltas, order), [ops.convert_to_tensor(v) for v in non_trainable], x, training=False
            )
            return ops.cast(outputs, "float32")

        def count_correct(logits, y, mask):
            return ops.sum(ops.cast(ops.equal(ops.cast(ops.argmax(logits, -1), "int32"), y), "int32") * mask)

        def make_functions(order):
            def correct_count(deltas, x, y, mask):
                return count_correct(logits_with(deltas, order, x), y, mask)

            def adversarial_correct_count(x, y, mask, radii):
                deltas = [ops.zeros_like(_matrix(trainable[position[n]], "dense")) for n in order]

                def loss(*deltas):
                    logits = logits_with(deltas, order, x)
                    losses = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
                    return ops.sum(losses if backend.BACKEND == "tensorflow" else losses * ops.cast(mask, "float32"))

                def ascend(_, deltas):
                    gradients = backend.grad(loss, *deltas)
                    return [
                        project_to_ball(d + step_size * steepest_ascent_vertex(g, radii[i], norm), radii[i], norm)
                        for i, (d, g) in enumerate(zip(deltas, gradients))
                    ]

                if backend.BACKEND == "tensorflow":
                    for step in range(steps):  # Unrolled, as before (the graph TensorFlow measured fastest).
                        deltas = ascend(step, deltas)
                else:  # One compiled step in a loop: XLA compiles `steps` unrolled copies much more slowly.
                    deltas = ops.fori_loop(0, steps, ascend, deltas)
                return count_correct(logits_with(deltas, order, x), y, mask)

            variables = model.variables
            return (compile_function(correct_count, variables=variables, jit_compile=jit_compile),
                    compile_function(adversarial_correct_count, variables=variables, jit_compile=jit_compile))

        # On JAX every batch is padded to one size (one compiled program), the padding masked out of the counts
        # and of the adversarial loss; TensorFlow relaxes its trace to the last batch's size instead.
        padded_size = min(batch_size, len(images)) if backend.BACKEND == "jax" else None

        def batches():
            for start in range(0, len(images), batch_size):
                x = np.asarray(images[start : start + batch_size], np.float32)
                y = labels[start : start + batch_size]
                mask = np.ones(len(x), np.int32)
                if padded_size and len(x) < padded_size:
                    missing = padded_size - len(x)
                    x = np.concatenate([x, np.repeat(x[-1:], missing, axis=0)])
                    y = np.concatenate([y, np.repeat(y[-1:], missing)])
                    mask = np.concatenate([mask, np.zeros(missing, np.int32)])
                yield tuple(ops.convert_to_tensor(value) for value in (x, y, mask))

        rng = np.random.default_rng(seed)

        def curve(order):
            correct_count, adversarial_correct_count = make_functions(order)
            accuracies, stds = [], []
            for epsilon in epsilons:
                radii = [epsilon * base_norms[n] if relative else epsilon for n in order]
                if kind == "adversarial":
                    radius_tensor = ops.convert_to_tensor(np.asarray(radii, np.float32))
                    total = sum(int(adversarial_correct_count(x, y, mask, radius_tensor)) for x, y, mask in batches())
                    accuracies.append(total / len(images))
                    stds.append(0.0)
                    continue
                draws = []
                for _ in range(num_draws):
                    deltas = []
                    for name, radius in zip(order, radii):
                        shape = tuple(_matrix(trainable[position[name]], "dense").shape)
                        if distribution == "uniform":
                            raw = rng.uniform(-1.0, 1.0, size=shape)
                        else:
                            raw = rng.standard_normal(size=shape)
                        raw = raw.astype(np.float32)
                        scale = radius / max(_operator_norm(raw, norm), 1e-30)
                        deltas.append(ops.convert_to_tensor(raw * np.float32(scale)))
                    total = sum(int(correct_count(deltas, x, y, mask)) for x, y, mask in batches())
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
