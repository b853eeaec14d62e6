"""Accuracy under random input noise (Gaussian or uniform), compiled and seeded per example."""

import time

import numpy as np
import tensorflow as tf

from keras_wssi.evaluation import attacks as attacks_module
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
    component. Example `i`'s noise is keyed by `(seed, draw, i)`, so results do not depend on `batch_size`.

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

    @tf.function(
        input_signature=[
            tf.TensorSpec([batch_size, *example_shape], tf.float32),
            tf.TensorSpec([batch_size], tf.int32),
            tf.TensorSpec([batch_size], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
        ]
    )
    def correct_under_noise(x, y, indices, level, draw):
        base = tf.random.experimental.stateless_fold_in(tf.constant([int(seed) & 0x7FFFFFFF, 0x401E], tf.int64), draw)

        def sample(index):
            key = tf.random.experimental.stateless_fold_in(base, index)
            if kind == "gaussian":
                return tf.random.stateless_normal(example_shape, key)
            return tf.random.stateless_uniform(example_shape, key, -1.0, 1.0)

        noise = tf.map_fn(sample, indices, fn_output_signature=tf.TensorSpec(example_shape, tf.float32))
        noisy = x + level * noise
        if clip_min is not None:
            noisy = tf.clip_by_value(noisy, clip_min, clip_max)
        logits = tf.cast(logits_fn(noisy), tf.float32)
        return tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y)

    started = time.perf_counter()
    positions = np.arange(len(images), dtype=np.int32)
    accuracy = []
    for level in levels:
        correct_total = 0
        for draw in range(draws):
            for start, stop in _batches(len(images), batch_size):
                correct = correct_under_noise(
                    tf.constant(_padded(images, start, stop, batch_size)),
                    tf.constant(_padded(labels, start, stop, batch_size)),
                    tf.constant(_padded(positions, start, stop, batch_size)),
                    tf.constant(level, tf.float32),
                    tf.constant(draw, tf.int32),
                )
                correct_total += int(correct.numpy()[: stop - start].sum())
        accuracy.append(correct_total / (len(images) * draws))
    settings = {
        "kind": kind,
        "level": "standard deviation" if kind == "gaussian" else "half-width of [-level, level]",
        "draws": draws,
        "batch_size": batch_size,
        "seed": int(seed),
        "clip_min": clip_min,
        "clip_max": clip_max,
        "examples": len(images),
    }
    if note:
        settings["logits"] = note
    return {"epsilons": levels, "accuracy": accuracy, "settings": settings, "seconds": time.perf_counter() - started}
