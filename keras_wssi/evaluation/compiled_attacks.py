"""APGD (CE, DLR, targeted DLR), FAB-T and Square written in `keras.ops`: the kernels of the attack ensemble
(TensorFlow and JAX backends).

These are keras_wssi's own implementations of the attacks of AutoAttack (Croce & Hein 2020), following
DESIGN.md §1.6 and the authors' reference code (github.com/fra31/auto-attack, PyTorch):

- **APGD** (`apgd_batch`): step size `η = 2ε` at start, momentum 0.75, checkpoints `w_j = ⌈p_j N⌉`
  (`checkpoints`), where the step is halved and the iterate restarts from the best point when fewer than
  `ρ = 0.75` of the steps since the last checkpoint increased the loss, or when the step was not halved at the
  last checkpoint and the best loss has not improved since. Losses: cross-entropy, DLR, targeted DLR.
- **FAB-T** (`fab_batch`): Croce & Hein (2020b), targeted: the decision boundary between the true and the
  target class is linearised at the iterate; the iterate and the original point are projected onto that
  hyperplane inside the box, the two steps are mixed (`α ≤ α_max = 0.1`), extrapolated by `η = 1.05`, and
  after each success the iterate moves back towards the original point (`β = 0.9`). The box-constrained
  projections (minimal L∞ or L2 norm) are solved by bisection on their one free parameter instead of the
  reference code's sort, which gives the same point to ~1e-7.
- **Square** (`square_batch`, L∞): Andriushchenko et al. (2020): random vertical stripes at `±ε`, then one
  random square window per query set to `x ± ε` with the margin loss, kept when it lowers the loss; the window
  side follows the reference `p` schedule (`p_init = 0.8` in AutoAttack). A proposal that would not change the
  window flips its signs (the reference code redraws them).

Every kernel is written once in `keras.ops` and works on one padded batch inside one compiled function
(`keras_wssi.backend.function`: a `tf.function` on TensorFlow, `jax.jit` on JAX); `make_kernel` compiles it once
per attack (and per batch-size bucket), and `run_attack` feeds it the still-robust examples, chunk by chunk. Random numbers come
from a counter-based hash of `(seed, attack, restart/target, example index, iteration)`, so an example's
attack does not depend on the batch size, on which other examples are still robust, or on graph-versus-XLA
execution. Each kernel also returns how many forward passes it spent on each example.
"""

import math

import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi.evaluation.attacks import EvaluationError

__all__ = [
    "DLR_EPSILON",
    "HASH_DTYPE",
    "apgd_batch",
    "attack_kernel",
    "attack_runs",
    "checkpoints",
    "dlr_loss",
    "fab_batch",
    "make_kernel",
    "run_attack",
    "run_key",
    "square_batch",
    "square_image_shape",
    "square_l2_pattern",
    "square_window_sizes",
    "targeted_dlr_loss",
]

DLR_EPSILON = 1e-12
_MASK32 = 0xFFFFFFFF
# The integer type of the counter-based hash: int64 holding uint32 values on TensorFlow (whose uint32 arithmetic
# is patchy), uint32 itself on JAX (no int64 without x64). `_mul32` gives the same 32-bit results in both.
HASH_DTYPE = "int64" if backend.BACKEND == "tensorflow" else "uint32"


# ---------------------------------------------------------------------------------------------------------
# Counter-based random numbers (vectorised murmur3 finaliser on 32-bit values).


def _hash_constant(value):
    return ops.convert_to_tensor(np.asarray(value, HASH_DTYPE))


def _mask(h):
    return ops.bitwise_and(h, _hash_constant(_MASK32)) if HASH_DTYPE == "int64" else h


def _mul32(a, constant):
    """`(a * constant) mod 2^32` for `a` in `[0, 2^32)` without int64 overflow (exact in uint32 arithmetic too)."""
    low, high = constant & 0xFFFF, constant >> 16
    product = a * _hash_constant(low) + ops.bitwise_and(a * _hash_constant(high), _hash_constant(0xFFFF)) * (
        _hash_constant(65536))
    return _mask(product)


def _shift(h, bits):
    return ops.right_shift(h, _hash_constant(bits))


def _fmix(h):
    h = ops.bitwise_xor(h, _shift(h, 16))
    h = _mul32(h, 0x85EBCA6B)
    h = ops.bitwise_xor(h, _shift(h, 13))
    h = _mul32(h, 0xC2B2AE35)
    return ops.bitwise_xor(h, _shift(h, 16))


def _as_hash(value):
    return _mask(ops.cast(value, HASH_DTYPE))


def _uniform(key, indices, counter, count):
    """`(batch, count)` floats in `(0, 1)`, a function of `(key, example index, counter, position)` only (the same
    numbers on every backend)."""
    key, indices, counter = _as_hash(key), _as_hash(indices), _as_hash(counter)
    per_example = _fmix(ops.bitwise_xor(_fmix(ops.bitwise_xor(_fmix(key), indices)),
                                        _fmix(_mask(counter + _hash_constant(1)))))
    positions = _fmix(_hash_constant(np.arange(count, dtype=np.int64) + 0x632BE5AB))
    h = _fmix(ops.bitwise_xor(per_example[:, None], positions[None, :]))
    return (ops.cast(_shift(h, 8), "float32") + 0.5) / 16777216.0


def run_key(seed, attack_name, run):
    """The integer key of one run (restart or target) of one attack: `(seed, attack, run)` mixed into 32 bits.

    Example:

    ```python
    run_key(0, "apgd_ce", 0) != run_key(1, "apgd_ce", 0)
    ```
    """
    value = (int(seed) * 0x9E3779B1 + sum(ord(ch) * 31**i for i, ch in enumerate(attack_name)) * 0x85EBCA77
             + int(run) * 0xC2B2AE3D) & _MASK32
    return value


# ---------------------------------------------------------------------------------------------------------
# Losses and schedules.


def _sorted_descending(values):
    return ops.flip(ops.sort(values, axis=-1), axis=-1)


def _pick(values, indices):
    """`values[i, indices[i]]` per row."""
    indices = ops.cast(indices, "int32")
    return ops.take_along_axis(values, ops.expand_dims(indices, 1), axis=1)[:, 0]


def dlr_loss(logits, labels):
    """Untargeted DLR loss `−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)`, per example (DESIGN.md §1.6).

    Args:
        logits: `(batch, classes)` float logits, at least 3 classes.
        labels: `(batch,)` int true classes.

    Returns:
        `(batch,)` losses; higher means closer to (or past) a misclassification.

    Example:

    ```python
    dlr_loss(np.array([[3.0, 1.0, 0.0]]), np.array([0]))   # -(3 - 1) / (3 - 0) = -0.667
    ```
    """
    logits = ops.cast(logits, "float32")
    classes = logits.shape[-1]
    ordered = _sorted_descending(logits)
    true = _pick(logits, labels)
    others = ops.where(ops.one_hot(labels, classes) > 0, ops.full_like(logits, -np.inf), logits)
    return -(true - ops.max(others, axis=-1)) / (ordered[:, 0] - ordered[:, 2] + DLR_EPSILON)


def targeted_dlr_loss(logits, labels, targets):
    """Targeted DLR loss `−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)`, per example (DESIGN.md §1.6).

    Args:
        logits: `(batch, classes)` float logits, at least 4 classes.
        labels: `(batch,)` int true classes.
        targets: `(batch,)` int target classes.

    Returns:
        `(batch,)` losses; maximising it pushes the target logit above the true one.

    Example:

    ```python
    targeted_dlr_loss(logits, labels, targets)
    ```
    """
    logits = ops.cast(logits, "float32")
    ordered = _sorted_descending(logits)
    true = _pick(logits, labels)
    target = _pick(logits, targets)
    return -(true - target) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + DLR_EPSILON)


def checkpoints(n_iter):
    """APGD's checkpoints `w_j = ⌈p_j N⌉`, `p_0 = 0`, `p_1 = 0.22`, `p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`.

    Args:
        n_iter: the number of iterations `N` (≥ 1).

    Returns:
        The increasing list `[w_1, w_2, …]` of iterations (1-based, all ≤ N) after which the step-size rule is
        checked (`w_0 = 0` is left out; duplicates from small `N` are removed).

    Example:

    ```python
    checkpoints(100)   # [22, 41, 57, 70, 80, 87, 93, 99]
    ```
    """
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise EvaluationError(f"n_iter must be a positive integer, got {n_iter!r}.")
    previous, current = 0.0, 0.22
    points = []
    while current <= 1.0:
        w = int(math.ceil(round(current * n_iter, 9)))
        if w >= 1 and (not points or w > points[-1]) and w <= n_iter:
            points.append(w)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


def square_image_shape(example_shape):
    """The `(height, width, channels)` layout Square draws its windows in, for a model's example shape.

    `(H, W, C)` and `(H, W)` images are used as they are; a flat `(D,)` input with `D` a perfect square (MNIST's
    784) is read as a `(√D, √D, 1)` image.
    """
    shape = tuple(int(s) for s in example_shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return shape + (1,)
    if len(shape) == 1:
        side = int(round(math.sqrt(shape[0])))
        if side * side == shape[0]:
            return (side, side, 1)
    raise EvaluationError(
        f"The Square attack needs image inputs (H, W, C), (H, W) or a flat square image (D = side²); the model's "
        f"examples have shape {shape}."
    )


def square_window_sizes(n_queries, image_shape, p_init):
    """Side of the Square attack's window at each query (the reference `p` schedule, rescaled to 10,000 queries)."""
    height, width, channels = image_shape
    features = height * width * channels
    sizes = []
    for i in range(n_queries):
        it = int(i / n_queries * 10000)
        if it <= 10:
            p = p_init
        else:
            for bound, divisor in ((50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                                   (8000, 256)):
                if it <= bound:
                    p = p_init / divisor
                    break
            else:
                p = p_init / 512
        side = max(int(round(math.sqrt(p * features / channels))), 1)
        sizes.append(min(side, min(height, width) - 1) if min(height, width) > 1 else 1)
    return sizes


# ---------------------------------------------------------------------------------------------------------
# Helpers on batches of examples.


def _flat(x):
    return ops.reshape(x, (-1, int(np.prod(x.shape[1:]))))


def _per_example(values, x):
    """Broadcasts `(batch,)` values against `x`'s shape."""
    return ops.reshape(values, (-1,) + (1,) * (len(x.shape) - 1))


def _l2(x):
    return ops.sqrt(ops.sum(ops.square(_flat(x)), axis=1))


def _project(x_new, x, eps, norm, clip_min, clip_max):
    """Projection onto the ε-ball around `x`, then the box (which keeps the point inside the ball)."""
    if norm == "linf":
        x_new = ops.clip(x_new, x - eps, x + eps)
    else:
        delta = x_new - x
        length = _l2(delta)
        scale = ops.minimum(1.0, eps / ops.maximum(length, 1e-12))
        x_new = x + delta * _per_example(scale, x)
    return ops.clip(x_new, clip_min, clip_max)


def _random_start(x, indices, key, eps, norm, clip_min, clip_max):
    size = int(np.prod(x.shape[1:]))
    if norm == "linf":
        t = 2.0 * _uniform(key, indices, 0, size) - 1.0
        t = t / ops.maximum(ops.max(ops.abs(t), axis=1, keepdims=True), 1e-12)
    else:
        u1, u2 = _uniform(key, indices, 0, size), _uniform(key, indices, 1, size)
        t = ops.sqrt(-2.0 * ops.log(u1)) * ops.cos(2.0 * np.pi * u2)
        t = t / ops.maximum(ops.sqrt(ops.sum(ops.square(t), axis=1, keepdims=True)), 1e-12)
    return ops.clip(x + eps * ops.reshape(t, (-1,) + tuple(x.shape[1:])), clip_min, clip_max)


def _targets(logits, rank):
    """The class ranked `rank` (1 = most likely) by each example's logits (ties: the lower class first)."""
    order = ops.argsort(-logits, axis=-1)
    return ops.cast(ops.take(order, ops.cast(rank, "int32") - 1, axis=1), "int32")


def _predicted(logits):
    return ops.cast(ops.argmax(logits, axis=1), "int32")


def _value_and_grad(fn, point):
    """`(logits, values, ∂Σvalues/∂point)` for `fn(point) -> (logits, values)`, from one forward pass."""
    (logits, values), pullback = backend.vjp(fn, point)
    (grad,) = pullback((ops.zeros_like(logits), ops.ones_like(values)))
    return logits, values, grad


# ---------------------------------------------------------------------------------------------------------
# APGD.


def apgd_batch(logits_fn, x, y, indices, eps, key, target_rank, n_iter, norm="linf", loss="ce", rho=0.75,
               random_start=True, clip_min=0.0, clip_max=1.0):
    """APGD on one batch (Croce & Hein 2020, DESIGN.md §1.6); call it inside a compiled function
    (`keras_wssi.backend.function`).

    Args:
        logits_fn: `x -> logits` (float32).
        x: `(batch, …)` inputs in the box.
        y: `(batch,)` int32 true labels.
        indices: `(batch,)` int32 example indices (key the random start).
        eps: scalar ε.
        key: scalar run key (`HASH_DTYPE`, any integer type works) (seed, attack, restart; see `run_key`).
        target_rank: scalar int32: for `loss="dlr_targeted"`, the target is the class ranked `target_rank`
            by the clean logits (2 = the most likely wrong class of a correctly classified example).
        n_iter: iterations `N` (Python int).
        norm: `"linf"` or `"l2"`.
        loss: `"ce"`, `"dlr"` or `"dlr_targeted"`.
        rho: the checkpoint's fraction of loss-increasing steps.
        random_start: start from a random point on the ε-sphere (the reference code's start) or at `x`.
        clip_min, clip_max: the box.

    Returns:
        `(x_out, correct, forwards)`: the first adversarial example found (else the highest-loss point), whether
        the model still classifies `x_out` correctly, and forward passes spent per example (int32).

    Example:

    ```python
    x_adv, correct, forwards = backend.function(lambda x, y: apgd_batch(
        model, x, y, np.arange(len(y)), 0.1, 7, 0, 100), variables=model.variables)(x, y)
    ```
    """
    x = ops.cast(x, "float32")
    y = ops.cast(y, "int32")
    eps = ops.cast(eps, "float32")
    marks = checkpoints(n_iter)
    is_check = np.zeros(n_iter + 1, bool)
    segment = np.ones(n_iter + 1, np.float32)
    previous = 0
    for w in marks:
        is_check[w] = True
        segment[w] = w - previous
        previous = w
    is_check, segment = ops.convert_to_tensor(is_check), ops.convert_to_tensor(segment)
    forwards = 0
    if loss == "dlr_targeted":
        targets = _targets(ops.cast(logits_fn(x), "float32"), target_rank)
        forwards += 1
    else:
        targets = y

    def logits_and_loss(point):
        logits = ops.cast(logits_fn(point), "float32")
        if loss == "ce":
            values = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        elif loss == "dlr":
            values = dlr_loss(logits, y)
        else:
            values = targeted_dlr_loss(logits, y, targets)
        return logits, values

    def loss_and_grad(point):
        return _value_and_grad(logits_and_loss, point)

    def direction(grad):
        if norm == "linf":
            return ops.sign(grad)
        return grad / _per_example(ops.maximum(_l2(grad), 1e-12), grad)

    x0 = _random_start(x, indices, key, eps, norm, clip_min, clip_max) if random_start else x
    logits, loss0, grad0 = loss_and_grad(x0)
    forwards += 1
    found = ops.not_equal(_predicted(logits), y)
    x_found = ops.where(_per_example(found, x), x0, x)
    step = ops.full_like(loss0, 2.0) * eps
    state = (
        ops.convert_to_tensor(0, "int32"), x0, x0, grad0, step, x0, loss0, grad0, loss0, ops.zeros_like(loss0),
        loss0, ops.ones_like(found), found, x_found,
    )

    def body(k, x_cur, x_prev, grad, step, x_best, loss_best, grad_best, loss_prev, increases, loss_at_check,
             reduced_last, found, x_found):
        momentum = ops.where(k > 0, 0.75, 1.0)
        z = _project(x_cur + _per_example(step, x) * direction(grad), x, eps, norm, clip_min, clip_max)
        x_new = _project(x_cur + momentum * (z - x_cur) + (1.0 - momentum) * (x_cur - x_prev), x, eps, norm,
                         clip_min, clip_max)
        logits, values, grad_new = loss_and_grad(x_new)
        fooled = ops.not_equal(_predicted(logits), y)
        x_found = ops.where(_per_example(fooled & ~found, x), x_new, x_found)
        found = found | fooled
        increases = increases + ops.cast(values > loss_prev, "float32")
        improved = values > loss_best
        x_best = ops.where(_per_example(improved, x), x_new, x_best)
        grad_best = ops.where(_per_example(improved, x), grad_new, grad_best)
        loss_best = ops.where(improved, values, loss_best)
        check = ops.take(is_check, k + 1)
        oscillating = increases < rho * ops.take(segment, k + 1)
        stalled = ~reduced_last & (loss_at_check >= loss_best)
        reduce = check & (oscillating | stalled)
        step = ops.where(reduce, step / 2.0, step)
        x_next = ops.where(_per_example(reduce, x), x_best, x_new)
        grad_next = ops.where(_per_example(reduce, x), grad_best, grad_new)
        reduced_last = ops.where(check, reduce, reduced_last)
        loss_at_check = ops.where(check, loss_best, loss_at_check)
        increases = ops.where(check, ops.zeros_like(increases), increases)
        return (k + 1, x_next, x_cur, grad_next, step, x_best, loss_best, grad_best, values, increases,
                loss_at_check, reduced_last, found, x_found)

    final = ops.while_loop(lambda k, *rest: k < n_iter, body, state, maximum_iterations=n_iter)
    x_best, found, x_found = final[5], final[12], final[13]
    x_out = ops.where(_per_example(found, x), x_found, x_best)
    correct = ops.equal(_predicted(ops.cast(logits_fn(x_out), "float32")), y)
    forwards += n_iter + 1
    return x_out, correct, ops.full_like(y, forwards)


# ---------------------------------------------------------------------------------------------------------
# FAB-T.


def _repeat(count, step, state):
    """`state ← step(state)`, `count` times: unrolled on TensorFlow (faster than a nested graph loop), an
    `ops.fori_loop` on JAX (XLA compiles a small loop much faster than a long unrolled body). Same arithmetic."""
    if backend.BACKEND == "tensorflow":
        for _ in range(count):
            state = step(state)
        return state
    return ops.fori_loop(0, count, lambda _, value: step(value), state)


def _hyperplane_step(point, w, c, norm, clip_min, clip_max, iterations=40):
    """The smallest step `d` (L∞ or L2) with `w·d = c` and `point + d` inside the box (as close as possible if
    the box does not reach the hyperplane). `point`, `w`: `(batch, D)`; `c`: `(batch,)`."""
    sign_c = ops.where(c >= 0, 1.0, -1.0)
    target = ops.abs(c)
    if norm == "linf":
        direction = ops.sign(w) * sign_c[:, None]
        room = ops.where(direction > 0, clip_max - point, point - clip_min)
        room = ops.where(direction == 0, 0.0, ops.maximum(room, 0.0))
        weight = ops.abs(w)
        reach = ops.sum(weight * room, axis=1)

        def halve(bounds):
            low, high = bounds
            middle = 0.5 * (low + high)
            enough = ops.sum(weight * ops.minimum(middle[:, None], room), axis=1) >= target
            return ops.where(enough, low, middle), ops.where(enough, middle, high)

        _, high = _repeat(iterations, halve, (ops.zeros_like(target), ops.max(room, axis=1)))
        high = ops.where(reach >= target, high, ops.max(room, axis=1))
        return direction * ops.minimum(high[:, None], room)
    lower, upper = clip_min - point, clip_max - point
    norm_sq = ops.maximum(ops.sum(ops.square(w), axis=1), 1e-20)
    start = ops.maximum(target / norm_sq, 1e-30)
    log_low, log_high = ops.log(start), ops.log(start) + 40.0 * math.log(2.0)

    def step_for(log_lambda):
        lam = ops.exp(log_lambda) * sign_c
        return ops.clip(lam[:, None] * w, lower, upper)

    def halve(bounds):
        log_low, log_high = bounds
        middle = 0.5 * (log_low + log_high)
        enough = ops.abs(ops.sum(w * step_for(middle), axis=1)) >= target
        return ops.where(enough, log_low, middle), ops.where(enough, middle, log_high)

    _, log_high = _repeat(iterations + 20, halve, (log_low, log_high))
    return step_for(log_high)


def fab_batch(logits_fn, x, y, indices, eps, key, target_rank, n_iter, norm="linf", alpha_max=0.1, eta=1.05,
              beta=0.9, clip_min=0.0, clip_max=1.0):
    """FAB-T on one batch (Croce & Hein 2020b, targeted version as in AutoAttack); call inside a compiled
    function (`keras_wssi.backend.function`).

    Args:
        logits_fn, x, y, indices, eps, key: as in `apgd_batch` (FAB-T starts at `x`: no random numbers).
        target_rank: the target is the class ranked `target_rank` by the clean logits.
        n_iter: iterations.
        norm: `"linf"` or `"l2"`.
        alpha_max, eta, beta: the reference code's mixing bound, extrapolation and backward step.
        clip_min, clip_max: the box.

    Returns:
        `(x_out, correct, forwards)`: the smallest-norm adversarial example found if its norm is ≤ ε (else `x`),
        whether `x_out` is still classified correctly, and forward passes per example.

    Example:

    ```python
    x_adv, correct, _ = fab_batch(model, x, y, np.arange(len(y)), 0.1, 0, 2, 100)
    ```
    """
    del indices, key
    x = ops.cast(x, "float32")
    y = ops.cast(y, "int32")
    eps = ops.cast(eps, "float32")
    example_shape = tuple(x.shape[1:])
    x_flat = _flat(x)
    targets = _targets(ops.cast(logits_fn(x), "float32"), target_rank)

    def logits_and_difference(point):
        logits = ops.cast(logits_fn(point), "float32")
        return logits, _pick(logits, targets) - _pick(logits, y)

    def size(delta):
        return ops.max(ops.abs(delta), axis=1) if norm == "linf" else ops.sqrt(ops.sum(ops.square(delta), axis=1))

    def unflat(point):
        return ops.reshape(point, (-1,) + example_shape)

    def body(k, x1, adv, best):
        _, difference, grad = _value_and_grad(logits_and_difference, unflat(x1))
        w = _flat(grad)
        d1 = _hyperplane_step(x1, w, -difference, norm, clip_min, clip_max)
        d2 = _hyperplane_step(x_flat, w, -difference - ops.sum(w * (x_flat - x1), axis=1), norm, clip_min,
                              clip_max)
        a1 = ops.maximum(size(d1), 1e-8)
        a2 = ops.maximum(size(d2), 1e-8)
        alpha = ops.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1 = ops.clip((x1 + eta * d1) * (1.0 - alpha) + (x_flat + eta * d2) * alpha, clip_min, clip_max)
        fooled = ops.not_equal(_predicted(ops.cast(logits_fn(unflat(x1)), "float32")), y)
        distance = size(x1 - x_flat)
        better = fooled & (distance < best)
        adv = ops.where(better[:, None], x1, adv)
        best = ops.where(better, distance, best)
        x1 = ops.where(fooled[:, None], x_flat + (x1 - x_flat) * beta, x1)
        return k + 1, x1, adv, best

    state = (ops.convert_to_tensor(0, "int32"), x_flat, x_flat, ops.full_like(y, np.inf, dtype="float32"))
    _, _, adv, best = ops.while_loop(lambda k, *rest: k < n_iter, body, state, maximum_iterations=n_iter)
    within = best <= eps * (1.0 + 1e-6)
    x_out = unflat(ops.where(within[:, None], _project(adv, x_flat, eps, norm, clip_min, clip_max), x_flat))
    correct = ops.equal(_predicted(ops.cast(logits_fn(x_out), "float32")), y)
    return x_out, correct, ops.full_like(y, 2 * n_iter + 2)


# ---------------------------------------------------------------------------------------------------------
# Square (L∞).


def _margin(logits, y):
    logits = ops.cast(logits, "float32")
    true = _pick(logits, y)
    others = ops.where(ops.one_hot(y, logits.shape[1]) > 0, ops.full_like(logits, -np.inf), logits)
    return true - ops.max(others, axis=1)


def square_batch(logits_fn, x, y, indices, eps, key, target_rank, n_iter, norm="linf", p_init=0.8, clip_min=0.0,
                 clip_max=1.0):
    """Square attack (L∞ or L2, margin loss, Andriushchenko et al. 2020) on one batch; call inside a compiled
    function (`keras_wssi.backend.function`).

    Args:
        logits_fn, x, y, indices, eps, key: as in `apgd_batch`.
        target_rank: unused (untargeted).
        n_iter: queries per example (the initial stripes / tiles count as one).
        norm: `"linf"` or `"l2"` (see `_square_l2_batch`).
        p_init: initial fraction of pixels in a window.
        clip_min, clip_max: the box.

    Returns:
        `(x_out, correct, forwards)`: the lowest-margin point found, whether it is still classified correctly,
        and queries (forward passes) spent per example: an example stops being queried once it is fooled.

    Example:

    ```python
    x_adv, correct, queries = square_batch(model, x, y, np.arange(len(y)), 0.1, 3, 0, 5000)
    ```
    """
    del target_rank
    if norm == "l2":
        return _square_l2_batch(logits_fn, x, y, indices, eps, key, n_iter, p_init, clip_min, clip_max)
    if norm != "linf":
        raise EvaluationError(f"keras_wssi's Square attack is L∞ or L2, got norm={norm!r}.")
    x = ops.cast(x, "float32")
    y = ops.cast(y, "int32")
    eps = ops.cast(eps, "float32")
    example_shape = tuple(x.shape[1:])
    height, width, channels = square_image_shape(example_shape)
    image = ops.reshape(x, (-1, height, width, channels))
    stripes = ops.where(_uniform(key, indices, 0, width * channels) < 0.5, -1.0, 1.0)
    stripes = ops.reshape(stripes, (-1, 1, width, channels))
    best = ops.clip(image + eps * stripes, clip_min, clip_max)

    def margin_of(point):
        return _margin(logits_fn(ops.reshape(point, (-1,) + example_shape)), y)

    margin = margin_of(best)
    sizes = ops.convert_to_tensor(np.asarray(square_window_sizes(n_iter, (height, width, channels), p_init),
                                             np.int32))
    rows = ops.reshape(ops.arange(height, dtype="int32"), (1, height, 1, 1))
    cols = ops.reshape(ops.arange(width, dtype="int32"), (1, 1, width, 1))

    def body(i, best, margin, queries):
        active = margin > 0
        side = ops.take(sizes, i)
        draws = _uniform(key, indices, i + 1, 2 + channels)
        top = ops.cast(ops.floor(draws[:, 0] * ops.cast(height - side + 1, "float32")), "int32")
        left = ops.cast(ops.floor(draws[:, 1] * ops.cast(width - side + 1, "float32")), "int32")
        signs = ops.where(draws[:, 2:] < 0.5, -1.0, 1.0)[:, None, None, :]
        top, left = top[:, None, None, None], left[:, None, None, None]
        window = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        window = window & ops.ones_like(best, dtype="bool")
        proposal = ops.where(window, ops.clip(image + eps * signs, clip_min, clip_max), best)
        unchanged = ops.all(ops.abs(_flat(proposal - best)) < 1e-7, axis=1)
        flipped = ops.where(window, ops.clip(image - eps * signs, clip_min, clip_max), best)
        proposal = ops.where(_per_example(unchanged, proposal), flipped, proposal)
        best, margin = _square_accept(proposal, best, margin, active, margin_of)
        return i + 1, best, margin, queries + ops.cast(active, "int32")

    return _square_loop(body, best, margin, y, n_iter, example_shape)


def _square_accept(proposal, best, margin, active, margin_of):
    """Square's acceptance step (L∞ and L2 alike): keep `proposal` where it lowers an active example's margin."""
    new_margin = margin_of(proposal)
    accept = active & (new_margin < margin)
    return ops.where(_per_example(accept, best), proposal, best), ops.where(accept, new_margin, margin)


def _square_loop(body, best, margin, y, n_iter, example_shape):
    """Runs Square's `body` for the `n_iter − 1` queries after the initial one; returns `(x_adv, robust, queries)`."""
    state = (ops.convert_to_tensor(0, "int32"), best, margin, ops.ones_like(y))
    _, best, margin, queries = ops.while_loop(
        lambda i, *rest: i < n_iter - 1, body, state, maximum_iterations=max(n_iter - 1, 0)
    )
    return ops.reshape(best, (-1,) + example_shape), margin > 0, queries


def _eta_rectangles(rows, cols):
    delta = np.zeros([rows, cols])
    centre_row, centre_col = rows // 2 + 1, cols // 2 + 1
    corner = [centre_row - 1, centre_col - 1]
    for counter in range(max(centre_row, centre_col)):
        delta[max(corner[0], 0):min(corner[0] + 2 * counter + 1, rows),
              max(0, corner[1]):min(corner[1] + 2 * counter + 1, cols)] += 1.0 / (counter + 1) ** 2
        corner[0] -= 1
        corner[1] -= 1
    return delta / np.sqrt(np.square(delta).sum())


def square_l2_pattern(side):
    """The L2 Square attack's `side × side` window pattern (reference `eta`): two opposite-signed pyramids, unit norm."""
    delta = np.zeros([side, side])
    delta[: side // 2] = _eta_rectangles(side // 2, side)
    delta[side // 2:] = -_eta_rectangles(side - side // 2, side)
    return (delta / np.sqrt(np.square(delta).sum())).astype(np.float32)


def _place(patterns, pattern_index, top, left, transpose, height, width):
    """Per example, pattern `pattern_index` (padded `(k, S, S)` stack), transposed where `transpose`, placed with
    its corner at `(top, left)` of an `(height, width)` grid; zero outside. Returns `(batch, height, width)`."""
    stack = ops.take(patterns, pattern_index, axis=0)
    stack = ops.where(transpose[:, None, None], ops.transpose(stack, (0, 2, 1)), stack)
    size = patterns.shape[1]
    rows = ops.arange(height, dtype="int32")[None, :] - top[:, None]
    cols = ops.arange(width, dtype="int32")[None, :] - left[:, None]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    row_index = ops.clip(rows, 0, size - 1)[:, :, None] + ops.zeros((1, 1, size), "int32")
    picked = ops.take_along_axis(stack, row_index, axis=1)
    col_index = ops.clip(cols, 0, size - 1)[:, None, :] + ops.zeros((1, height, 1), "int32")
    picked = ops.take_along_axis(picked, col_index, axis=2)
    return ops.where(inside, picked, 0.0)


def _square_l2_batch(logits_fn, x, y, indices, eps, key, n_iter, p_init, clip_min, clip_max):
    """Square attack, L2 (Andriushchenko et al. 2020, the reference code's `attack_single_run` for L2).

    Start: a grid of `h//5`-pixel tiles, each the pyramid pattern with a random sign per channel, scaled to the
    ε-sphere. Each query moves the perturbation's mass from a random window 2 into window 1 (side `s ≥ 3`, odd,
    from the `p` schedule): window 1 gets the old content normalised plus a new random-signed pattern, rescaled
    so that the total stays on the ε-sphere; kept when the margin drops. Positions, signs and transpositions are
    drawn per example (the reference code draws one position per batch).
    """
    x = ops.cast(x, "float32")
    y = ops.cast(y, "int32")
    eps = ops.cast(eps, "float32")
    example_shape = tuple(x.shape[1:])
    height, width, channels = square_image_shape(example_shape)
    image = ops.reshape(x, (-1, height, width, channels))

    def per_image_norm(values):
        return ops.sqrt(ops.sum(ops.square(values), axis=(1, 2, 3), keepdims=True))

    def margin_of(point):
        return _margin(logits_fn(ops.reshape(point, (-1,) + example_shape)), y)

    # Initial tiles.
    tile = max(height // 5, 1)
    offset = (height - tile * 5) // 2
    tile_pattern = ops.convert_to_tensor(square_l2_pattern(tile)[None] if tile >= 2 else np.ones([1, 1, 1], np.float32))
    spots = [(offset + i * tile, offset + j * tile) for i in range(height // tile) for j in range(width // tile)
             if offset + i * tile + tile <= height and offset + j * tile + tile <= width]
    draws = _uniform(key, indices, 0, len(spots) * (channels + 1))
    delta = ops.zeros_like(image)
    for number, (top, left) in enumerate(spots):
        column = number * (channels + 1)
        placed = _place(tile_pattern, ops.zeros_like(y), ops.full_like(y, top), ops.full_like(y, left),
                        draws[:, column] < 0.5, height, width)
        signs = ops.where(draws[:, column + 1:column + 1 + channels] < 0.5, -1.0, 1.0)[:, None, None, :]
        delta = delta + placed[:, :, :, None] * signs
    best = ops.clip(image + eps * delta / ops.maximum(per_image_norm(delta), 1e-12), clip_min, clip_max)
    margin = margin_of(best)

    sides = []
    for side in square_window_sizes(n_iter, (height, width, channels), p_init):
        side = max(side, 3)
        side += 1 - side % 2
        sides.append(min(side, min(height, width)))
    distinct = sorted(set(sides))
    largest = distinct[-1]
    patterns = np.zeros([len(distinct), largest, largest], np.float32)
    for number, side in enumerate(distinct):
        patterns[number, :side, :side] = square_l2_pattern(side)
    patterns = ops.convert_to_tensor(patterns)
    side_of = ops.convert_to_tensor(np.asarray(sides, np.int32))
    pattern_of = ops.convert_to_tensor(np.asarray([distinct.index(side) for side in sides], np.int32))
    rows = ops.reshape(ops.arange(height, dtype="int32"), (1, height, 1, 1))
    cols = ops.reshape(ops.arange(width, dtype="int32"), (1, 1, width, 1))

    def window(top, left, side):
        top, left = top[:, None, None, None], left[:, None, None, None]
        return ops.cast((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side), "float32")

    def body(i, best, margin, queries):
        active = margin > 0
        side = ops.take(side_of, i)
        draws = _uniform(key, indices, i + 1, 5 + channels)
        span = ops.cast(height - side + 1, "float32"), ops.cast(width - side + 1, "float32")
        top = ops.cast(ops.floor(draws[:, 0] * span[0]), "int32")
        left = ops.cast(ops.floor(draws[:, 1] * span[1]), "int32")
        top2 = ops.cast(ops.floor(draws[:, 2] * span[0]), "int32")
        left2 = ops.cast(ops.floor(draws[:, 3] * span[1]), "int32")
        signs = ops.where(draws[:, 5:] < 0.5, -1.0, 1.0)[:, None, None, :]
        first, second = window(top, left, side), window(top2, left2, side)
        delta = best - image
        norm_first = ops.sqrt(ops.sum(ops.square(delta * first), axis=(1, 2), keepdims=True))  # per channel
        norm_image = per_image_norm(delta)
        norm_windows = per_image_norm(delta * ops.maximum(first, second))
        pattern = _place(patterns, ops.zeros_like(y) + ops.take(pattern_of, i), top, left, draws[:, 4] < 0.5, height, width)
        new = pattern[:, :, :, None] * signs + delta * first / (1e-12 + norm_first)
        new_norm = ops.sqrt(ops.sum(ops.square(new * first), axis=(1, 2), keepdims=True))
        budget = ops.sqrt(ops.maximum(ops.square(eps) - ops.square(norm_image), 0.0) / channels + ops.square(norm_windows))
        new = new * first / (1e-12 + new_norm) * budget
        delta = delta * (1.0 - second) * (1.0 - first) + new
        proposal = ops.clip(image + eps * delta / ops.maximum(per_image_norm(delta), 1e-12), clip_min, clip_max)
        best, margin = _square_accept(proposal, best, margin, active, margin_of)
        return i + 1, best, margin, queries + ops.cast(active, "int32")

    return _square_loop(body, best, margin, y, n_iter, example_shape)


# ---------------------------------------------------------------------------------------------------------
# Tracing and running over a data set.

_KERNELS = {"apgd": apgd_batch, "fab": fab_batch, "square": square_batch}


def compile_function(fn, variables=(), jit_compile=False):
    """`fn` compiled by `keras_wssi.backend.function`, reading the current values of `variables`.

    `jit_compile` chooses XLA on TensorFlow (a `tf.function` graph otherwise); on JAX every function is
    `jax.jit`-compiled whatever it says (JAX has no graph mode: uncompiled, every op would run eagerly).
    """
    return backend.function(fn, variables=variables, jit_compile=bool(jit_compile) or backend.BACKEND == "jax")


def cached(owner, key, build):
    """`build()`, kept on `owner` (e.g. a logits function) under `key`, so the compiled function (and, on JAX, its
    compiled programs) is reused by every runner of the same model; unhashable keys build afresh."""
    cache = getattr(owner, "_keras_wssi_compiled", None)
    if cache is None:
        cache = {}
        try:
            owner._keras_wssi_compiled = cache
        except (AttributeError, TypeError):
            return build()
    try:
        if key not in cache:
            cache[key] = build()
        return cache[key]
    except TypeError:
        return build()


def make_kernel(logits_fn, example_shape, family, n_iter, norm, jit_compile=False, clip_min=0.0, clip_max=1.0,
                variables=(), **options):
    """Compiles one attack kernel (`keras_wssi.backend.function`); the batch dimension is free.

    Args:
        logits_fn: `x -> logits`.
        example_shape: the model's per-example input shape.
        family: `"apgd"`, `"fab"` or `"square"`.
        n_iter: iterations (queries for Square).
        norm: `"linf"` or `"l2"`.
        jit_compile: XLA on TensorFlow (compiles once per distinct batch size; `run_attack` rounds sizes to a few
            buckets); JAX always compiles (once per bucket).
        clip_min, clip_max: the box.
        variables: the variables `logits_fn` reads (`model.variables`): on JAX their current values are passed in
            on every call (otherwise the values at the first call are compiled in as constants).
        **options: the kernel's own settings (`loss`, `rho`, `alpha_max`, `p_init`, …).

    Returns:
        `kernel(x, y, indices, eps, key, target_rank) -> (x_out, correct, forwards)`; `key` has dtype `HASH_DTYPE`.

    Example:

    ```python
    kernel = make_kernel(lambda x: model(x, training=False), (28, 28, 1), "apgd", 100, "linf", loss="ce",
                         variables=model.variables)
    ```
    """
    if family not in _KERNELS:
        raise EvaluationError(f"Unknown attack family {family!r}: expected one of {', '.join(_KERNELS)}.")
    function = _KERNELS[family]

    def model_fn(x):
        return ops.cast(logits_fn(x), "float32")

    def kernel(x, y, indices, eps, key, target_rank):
        return function(model_fn, x, y, indices, eps, key, target_rank, n_iter, norm=norm, clip_min=clip_min,
                        clip_max=clip_max, **options)

    return compile_function(kernel, variables=variables, jit_compile=jit_compile)


def _bucket(count, batch_size):
    """The padded size of a call on `count` examples: the next of 32, 64, 128, … (at most `batch_size`) on
    TensorFlow, which relaxes its trace to a free batch dimension; on JAX, where every new size is a new XLA
    program, the size of the run's first call (see `run_attack`)."""
    size = 32
    while size < count:
        size *= 2
    return min(size, batch_size) if count <= batch_size else batch_size


def run_attack(kernel, images, labels, eps, active, runs, batch_size, on_chunk=None, resume=None):
    """Runs `kernel` over the `active` examples, chunk by chunk, each run only on the examples still robust.

    Args:
        kernel: from `make_kernel`.
        images: `(N, …)` float32 inputs; labels: `(N,)` int32.
        eps: ε.
        active: `(N,)` bool: the examples to attack (e.g. those classified correctly and still robust).
        runs: list of `(key, target_rank)`: restarts and/or targets, run in order.
        batch_size: examples per kernel call.
        on_chunk: called as `on_chunk(chunk_number, robust, forwards)` (the whole arrays) after each chunk, to
            save progress.
        resume: `(chunks_done, robust, forwards)` saved by `on_chunk` from an interrupted run with the same
            `active`: those chunks are skipped and their results kept.

    Returns:
        `(x_adv, robust, forwards)`: adversarial points (the input where not attacked or not fooled), the per-example
        flag "every run failed" (False where not active), and forward passes per example.

    Example:

    ```python
    runs = [(run_key(0, "apgd_ce", 0), 0)]
    x_adv, robust, forwards = run_attack(kernel, x_test, y_test, 0.1, clean_correct, runs, batch_size=500)
    ```
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    x_adv = images.copy()
    active = np.asarray(active, bool)
    robust = active.copy()
    forwards = np.zeros(len(images), np.int64)
    done = set()
    if resume is not None:
        done = set(int(c) for c in resume[0])
        robust = np.asarray(resume[1], bool).copy()
        forwards = np.asarray(resume[2], np.int64).copy()
    positions_all = np.flatnonzero(active)
    # JAX compiles one program per batch size: every call of this run is padded to one size.
    fixed_size = _bucket(min(len(positions_all), batch_size), batch_size) if backend.BACKEND == "jax" else None
    for chunk, start in enumerate(range(0, len(positions_all), batch_size)):
        positions = positions_all[start:start + batch_size]
        if chunk in done:
            continue
        for key, target_rank in runs:
            remaining = positions[robust[positions]]
            if not len(remaining):
                break
            size = fixed_size or _bucket(len(remaining), batch_size)
            padded = np.concatenate([remaining, np.repeat(remaining[-1:], size - len(remaining))])
            x_out, correct, spent = kernel(
                ops.convert_to_tensor(images[padded]), ops.convert_to_tensor(labels[padded]),
                ops.convert_to_tensor(padded.astype(np.int32)), ops.convert_to_tensor(np.float32(eps)),
                ops.convert_to_tensor(np.asarray(key, HASH_DTYPE)), ops.convert_to_tensor(np.int32(target_rank)),
            )
            count = len(remaining)
            x_out, correct, spent = (ops.convert_to_numpy(value)[:count] for value in (x_out, correct, spent))
            forwards[remaining] += spent
            fooled = ~correct
            x_adv[remaining[fooled]] = x_out[fooled]
            robust[remaining[fooled]] = False
        if on_chunk is not None:
            on_chunk(chunk, robust, forwards)
    return x_adv, robust, forwards


_FAMILIES = {
    "apgd_ce": ("apgd", {"loss": "ce"}),
    "apgd_dlr": ("apgd", {"loss": "dlr"}),
    "apgd_t": ("apgd", {"loss": "dlr_targeted"}),
    "fab_t": ("fab", {}),
    "square_compiled": ("square", {}),
}


def attack_kernel(attack, logits_fn, example_shape, jit_compile=False, clip_min=0.0, clip_max=1.0, variables=()):
    """The traced kernel of one of keras_wssi's own attacks (an `Attack` from `get_attack`, e.g. `"apgd_ce"`).

    Example:

    ```python
    kernel = attack_kernel(get_attack("apgd_t"), lambda x: model(x, training=False), (28, 28, 1),
                           variables=model.variables)
    ```
    """
    if attack.method not in _FAMILIES:
        raise EvaluationError(f"Attack {attack.name!r} is not one of keras_wssi's compiled attacks.")
    if clip_min is None or clip_max is None:
        raise EvaluationError(f"Attack {attack.name!r} needs a box: pass clip_min and clip_max.")
    family, options = _FAMILIES[attack.method]
    options = dict(options)
    settings = dict(attack.options)
    settings.pop("n_targets", None)
    options.update(settings)
    if family == "square":
        square_image_shape(example_shape)
    key = ("kernel", family, int(attack.nb_iter), attack.norm, tuple(example_shape), bool(jit_compile),
           float(clip_min), float(clip_max), tuple(sorted(options.items())), tuple(id(v) for v in variables))
    return cached(logits_fn, key, lambda: make_kernel(
        logits_fn, tuple(example_shape), family, int(attack.nb_iter), attack.norm, jit_compile=jit_compile,
        clip_min=float(clip_min), clip_max=float(clip_max), variables=variables, **options))


def attack_runs(attack, seed, num_classes):
    """The `(key, target_rank)` runs of an attack: one per restart, or one per target class (ranks 2, 3, …).

    Example:

    ```python
    attack_runs(get_attack("apgd_t"), seed=0, num_classes=10)   # 9 runs, target ranks 2..10
    ```
    """
    options = dict(attack.options)
    if attack.method in ("apgd_t", "fab_t"):
        minimum = 4 if attack.method == "apgd_t" else 2
        if num_classes < minimum:
            raise EvaluationError(
                f"Attack {attack.name!r} needs at least {minimum} classes (the targeted DLR loss reads the 4 largest "
                f"logits), the model has {num_classes}."
            )
        targets = min(int(options.get("n_targets", 9)), num_classes - 1)
        return [(run_key(seed, attack.name, rank), rank) for rank in range(2, targets + 2)]
    return [(run_key(seed, attack.name, restart), 0) for restart in range(attack.restarts)]
