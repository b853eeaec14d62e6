"""Accuracy under random input noise (Gaussian or uniform), compiled and seeded per example."""

import time

import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi.evaluation import attacks as attacks_module
from keras_wssi.evaluation import compiled_attacks
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.evaluation.runner import _batches
from keras_wssi.evaluation.runner import _check_clip
from keras_wssi.evaluation.runner import _padded
from keras_wssi.evaluation.runner import check_dataset

__all__ = ["NOISE_KINDS", "noise_accuracy"]

NOISE_KINDS = ("gaussian", "uniform")


def noise_accuracy(
    model,
    images,
    labels,
    levels,
    kind="gaussian",
    draws=1,
    batch_size=256,
    seed=0,
    clip_min=0.0,
    clip_max=1.0,
    recover_logits=False,
):
    """Accuracy on `clip(x + noise)` for each noise level: a curve dict for `Report.add_curve`.

    Gaussian noise has standard deviation `level`; uniform noise is drawn from `[-level, level]` per input
    component. Example `i`'s noise is keyed by `(seed, draw, i)` (the counter hash of `compiled_attacks`: the same
    draws on TensorFlow and JAX; Gaussian by Box–Muller), so results do not depend on `batch_size` or the backend.

    Args:
        model: a Keras classifier (logits; see `logits_function`).
        images: float inputs `(N, …)` inside `[clip_min, clip_max]`.
        labels: int labels `(N,)`.
        levels: noise levels (≥ 0): σ for `"gaussian"`, half-width for `"uniform"`.
        kind: `"gaussian"` or `"uniform"`.
        draws: noise draws per example; the accuracy is averaged over them.
        batch_size: examples per compiled call.
        seed: integer seed.
        clip_min: smallest valid input (None with clip_max: no clipping).
        clip_max: largest valid input.
        recover_logits: accept a softmax output.

    Returns:
        `{"epsilons": levels, "accuracy": [...], "settings": {...}, "seconds": float}`.

    Example:

    ```python
    curve = noise_accuracy(model, x_test, y_test, levels=[0.0, 0.1, 0.3], kind="gaussian")
    ```
    """
    if kind not in NOISE_KINDS:
        raise EvaluationError(f"kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}.")
    if not isinstance(draws, int) or draws < 1:
        raise EvaluationError(f"draws must be a positive integer, got {draws!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}.")
    levels = attacks_module.check_epsilons(levels, "levels")
    images, labels = check_dataset(images, labels, model)
    _check_clip(images, clip_min, clip_max)
    logits_fn, note = attacks_module.logits_function(model, images[:64], recover_logits=recover_logits)
    example_shape = images.shape[1:]

    key = compiled_attacks.run_key(seed, "noise_" + kind, 0)
    size = int(np.prod(example_shape))

    def correct_under_noise(x, y, indices, level, draw):
        # Per example, from the counter hash of (seed, example index, draw): independent of the batch.
        if kind == "gaussian":
            u1 = compiled_attacks._uniform(key, indices, 2 * draw, size)
            u2 = compiled_attacks._uniform(key, indices, 2 * draw + 1, size)
            noise = ops.sqrt(-2.0 * ops.log(u1)) * ops.cos(2.0 * np.pi * u2)
        else:
            noise = 2.0 * compiled_attacks._uniform(key, indices, 2 * draw, size) - 1.0
        noisy = x + level * ops.reshape(noise, (-1,) + tuple(example_shape))
        if clip_min is not None:
            noisy = ops.clip(noisy, clip_min, clip_max)
        logits = ops.cast(logits_fn(noisy), "float32")
        return ops.cast(ops.argmax(logits, axis=1), "int32") == y

    correct_under_noise = compiled_attacks.compile_function(correct_under_noise, variables=model.variables)
    started = time.perf_counter()
    positions = np.arange(len(images), dtype=np.int32)
    accuracy = []
    for level in levels:
        correct_total = 0
        for draw in range(draws):
            for start, stop in _batches(len(images), batch_size):
                correct = correct_under_noise(
                    ops.convert_to_tensor(_padded(images, start, stop, batch_size)),
                    ops.convert_to_tensor(_padded(labels, start, stop, batch_size)),
                    ops.convert_to_tensor(_padded(positions, start, stop, batch_size)),
                    ops.convert_to_tensor(np.float32(level)),
                    ops.convert_to_tensor(np.int32(draw)),
                )
                correct_total += int(ops.convert_to_numpy(correct)[: stop - start].sum())
        accuracy.append(correct_total / (len(images) * draws))
    settings = {
        "kind": kind,
        "level": "standard deviation" if kind == "gaussian" else "half-width of [-level, level]",
        "draws": draws,
        "batch_size": batch_size,
        "seed": int(seed),
        "backend": backend.BACKEND,
        "clip_min": clip_min,
        "clip_max": clip_max,
        "examples": len(images),
    }
    if note:
        settings["logits"] = note
    return {"epsilons": levels, "accuracy": accuracy, "settings": settings, "seconds": time.perf_counter() - started}
