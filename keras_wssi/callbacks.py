"""Callbacks: the slope distribution logged every epoch, and early stopping on it.

Johansson, Engsner, Strannegård, Mostad, "Slope and generalization properties of neural networks"
(arXiv 2107.01473) measure the slope `σ_max(∂logits/∂x)` on a fixed set of training points every epoch.
`SlopeLogger` does that and writes the summary into the epoch logs (so it lands in `History`, the progress
bar and any later callback) and, with `log_dir`, a TensorBoard histogram. `SlopeEarlyStopping` stops on it.
"""

import json
import math
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_wssi import validation
from keras_wssi.analysis.slope import slope as measure_slope

__all__ = [
    "AtomicBackupAndRestore",
    "AtomicWeightsCheckpoint",
    "PenaltyStrengthScheduler",
    "SetPipelineEpoch",
    "SlopeEarlyStopping",
    "SlopeLogger",
    "TerminateOnNonFinite",
    "linear_warmup",
]

_STATISTICS = ("mean", "median", "q10", "q90")


def _summary(values, prefix):
    return {
        f"{prefix}_mean": float(np.mean(values)),
        f"{prefix}_median": float(np.median(values)),
        f"{prefix}_q10": float(np.quantile(values, 0.1)),
        f"{prefix}_q90": float(np.quantile(values, 0.9)),
    }


class SlopeLogger(keras.callbacks.Callback):
    """Logs the slope distribution on fixed points at the end of every `every`-th epoch.

    Adds `<prefix>_mean`, `<prefix>_median`, `<prefix>_q10`, `<prefix>_q90` to the epoch logs (History,
    progress bar) and, when `log_dir` is given, writes a TensorBoard histogram `<prefix>` (step = epoch) to
    `log_dir/slope`. The full per-epoch values are kept in `self.values` (epoch → array).

    Args:
        x: the fixed points `(N, …)` (the paper uses 750 training points).
        every: log every this many epochs (1: every epoch).
        log_dir: TensorBoard folder, or None.
        prefix: prefix of the log keys and histogram name.
        batch_size, method: passed to `keras_wssi.analysis.slope`.

    Example:

    ```python
    model.fit(x_train, y_train, epochs=10, callbacks=[keras_wssi.callbacks.SlopeLogger(x_train[:750])])
    ```
    """

    def __init__(self, x, every=1, log_dir=None, prefix="slope", batch_size=256, method="auto"):
        super().__init__()
        x = np.asarray(x)
        if x.ndim < 2 or len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x must be a non-empty floating-point batch (N, …), got shape {x.shape} and dtype {x.dtype}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}.")
        if not isinstance(prefix, str) or not prefix.replace("_", "").isalnum():
            raise ValueError(f"prefix must be letters, digits and underscores, got {prefix!r}.")
        self.x = x
        self.every = every
        self.log_dir = log_dir
        self.prefix = prefix
        self.batch_size = batch_size
        self.method = method
        self.values = {}
        self._writer = None

    def _measure(self, epoch, logs):
        values = measure_slope(self.model, self.x, batch_size=self.batch_size, method=self.method)
        self.values[epoch] = values
        summary = _summary(values, self.prefix)
        if logs is not None:
            logs.update(summary)
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(f"{self.log_dir}/slope")
            with self._writer.as_default():
                tf.summary.histogram(self.prefix, values, step=epoch)
                for key, value in summary.items():
                    tf.summary.scalar(key, value, step=epoch)
            self._writer.flush()
        return summary

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self._measure(epoch, logs)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class SlopeEarlyStopping(SlopeLogger):
    """Stops training on the slope distribution of fixed points (measured as by `SlopeLogger`).

    Criteria (the statistic is `"median"`, `"mean"`, `"q10"` or `"q90"` of the slope on `x`):

    - `criterion="plateau"` (default): stop when the relative change of the statistic between consecutive
      measurements, `|s_t − s_{t−1}| / s_{t−1}`, has stayed below `min_delta` for `patience` measurements:
      the function's steepness has settled (Johansson et al. observe the slope distribution stabilises when
      training converges).
    - `criterion="threshold"`: stop as soon as the statistic exceeds `threshold` (a slope budget); with
      `restore_weights=True` the weights of the last epoch within the budget are restored.

    The statistic is also logged (`<prefix>_…` keys), so one callback does both.

    Args:
        x, every, log_dir, prefix, batch_size, method: as `SlopeLogger`.
        criterion: `"plateau"` or `"threshold"`.
        statistic: which summary is monitored.
        min_delta: relative-change tolerance for `"plateau"` (≥ 0).
        patience: measurements below `min_delta` before stopping (≥ 1).
        threshold: the budget for `"threshold"` (> 0).
        restore_weights: restore the last within-budget weights when the threshold stops training.

    Example:

    ```python
    stop = keras_wssi.callbacks.SlopeEarlyStopping(x_train[:750], criterion="plateau", min_delta=0.02)
    model.fit(x_train, y_train, epochs=50, callbacks=[stop])
    ```
    """

    def __init__(
        self,
        x,
        criterion="plateau",
        statistic="median",
        min_delta=0.02,
        patience=2,
        threshold=None,
        restore_weights=False,
        every=1,
        log_dir=None,
        prefix="slope",
        batch_size=256,
        method="auto",
    ):
        super().__init__(x, every=every, log_dir=log_dir, prefix=prefix, batch_size=batch_size, method=method)
        if criterion not in ("plateau", "threshold"):
            raise ValueError(f"criterion must be 'plateau' or 'threshold', got {criterion!r}.")
        if statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}.")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"min_delta must be a non-negative number, got {min_delta!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}.")
        if criterion == "threshold" and not (
            isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0
        ):
            raise ValueError(f"criterion='threshold' needs a finite positive threshold, got {threshold!r}.")
        self.criterion = criterion
        self.statistic = statistic
        self.min_delta = float(min_delta)
        self.patience = patience
        self.threshold = threshold
        self.restore_weights = bool(restore_weights)
        self.stopped_epoch = None

    def on_train_begin(self, logs=None):
        self._previous = None
        self._calm = 0
        self._within_budget_weights = self.model.get_weights() if self.restore_weights else None
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every != 0:
            return
        value = self._measure(epoch, logs)[f"{self.prefix}_{self.statistic}"]
        if self.criterion == "threshold":
            if value > self.threshold:
                self.stopped_epoch = epoch
                self.model.stop_training = True
                if self.restore_weights and self._within_budget_weights is not None:
                    self.model.set_weights(self._within_budget_weights)
            elif self.restore_weights:
                self._within_budget_weights = self.model.get_weights()
            return
        if self._previous is not None:
            change = abs(value - self._previous) / max(abs(self._previous), 1e-12)
            self._calm = self._calm + 1 if change < self.min_delta else 0
            if self._calm >= self.patience:
                self.stopped_epoch = epoch
                self.model.stop_training = True
        self._previous = value


class SetPipelineEpoch(keras.callbacks.Callback):
    """Tells a `keras_wssi.data.EpochShuffledPipeline` which epoch starts, so its order depends on the
    epoch index alone — also after `BackupAndRestore` resumes a run in the middle."""

    def __init__(self, pipeline):
        super().__init__()
        self.pipeline = pipeline

    def on_epoch_begin(self, epoch, logs=None):
        self.pipeline.set_epoch(epoch)


def _atomic_write_text(path, text):
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@keras.saving.register_keras_serializable(package="keras_wssi")
class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that can be killed at any instant without losing its state.

    Keras writes the weights and then the epoch counter in place: a process killed between (or during) the
    two writes leaves a half-written file, or weights of one epoch with the counter of another, and the
    resumed run silently ends elsewhere. Here each backup goes to a fresh folder `state-<n>/`, then a small
    pointer file `latest` is replaced atomically (`os.replace`), then older folders are removed; a
    restart reads whatever `latest` names, which is always complete.
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=False, delete_checkpoint=delete_checkpoint)
        self._pointer_path = os.path.join(backup_dir, "latest")

    def _state_dir(self):
        if not os.path.isfile(self._pointer_path):
            return None
        with open(self._pointer_path) as handle:
            name = handle.read().strip()
        path = os.path.join(self.backup_dir, name)
        return path if os.path.isdir(path) else None

    def _load_model(self):
        state_dir = self._state_dir()
        if os.path.isdir(self.backup_dir):
            # Leftovers of a run killed mid-save: folders `latest` does not name, temporary pointer files.
            for name in os.listdir(self.backup_dir):
                path = os.path.join(self.backup_dir, name)
                if (name.startswith("state-") and path != state_dir) or ".tmp-" in name:
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if state_dir is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(state_dir, "weights.weights.h5"))
        with open(os.path.join(state_dir, "training_metadata.json")) as handle:
            self.model._initial_epoch = json.load(handle)["epoch"]

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        existing = [n for n in os.listdir(self.backup_dir) if n.startswith("state-")]
        number = 1 + max([int(n.split("-")[1]) for n in existing if n.split("-")[1].isdigit()] or [0])
        name = f"state-{number}"
        path = os.path.join(self.backup_dir, name)
        os.makedirs(path)
        self.model.save_weights(os.path.join(path, "weights.weights.h5"))
        _atomic_write_text(
            os.path.join(path, "training_metadata.json"),
            json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}),
        )
        _atomic_write_text(self._pointer_path, name)
        for old in existing:
            shutil.rmtree(os.path.join(self.backup_dir, old), ignore_errors=True)

    def get_config(self):
        return {"backup_dir": self.backup_dir, "save_freq": self.save_freq, "delete_checkpoint": self.delete_checkpoint}


class AtomicWeightsCheckpoint(keras.callbacks.Callback):
    """Saves the weights after every epoch to `filepath.format(epoch=...)`, written to a temporary file
    and renamed, so an interrupted run never leaves a half-written checkpoint."""

    def __init__(self, filepath):
        super().__init__()
        if not filepath.endswith(".weights.h5"):
            raise ValueError(f"filepath must end in '.weights.h5', got {filepath!r}.")
        self.filepath = filepath

    def on_train_begin(self, logs=None):
        # A run killed while writing leaves only a temporary file behind: remove those, never a checkpoint.
        folder = os.path.dirname(self.filepath) or "."
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".tmp-" in name and name.endswith(".weights.h5"):
                    os.remove(os.path.join(folder, name))

    def on_epoch_end(self, epoch, logs=None):
        path = self.filepath.format(epoch=epoch + 1, **(logs or {}))
        temporary = f"{path[: -len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5"
        self.model.save_weights(temporary)
        os.replace(temporary, path)


class TerminateOnNonFinite(keras.callbacks.Callback):
    """Stops `fit` at the first batch whose loss or penalty value is NaN/Inf, naming the culprit and step.

    It raises `FloatingPointError` from `on_train_batch_end`, before any epoch-end callback runs, so no
    checkpoint, backup or model file with non-finite weights is written. The message names the first
    non-finite penalty (the loop logs each penalty separately), or the data term when only the loss is
    non-finite (check the inputs for NaN/Inf, or lower the learning rate).
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        penalty_names = [p.name for p in getattr(self.model, "penalties", [])]
        bad = [name for name in penalty_names if name in logs and not np.all(np.isfinite(logs[name]))]
        loss = logs.get("loss")
        loss_bad = loss is not None and not np.all(np.isfinite(loss))
        if not bad and not loss_bad:
            return
        step = self._epoch, batch
        if bad:
            culprit = f"penalty {bad[0]!r} is {float(logs[bad[0]])}"
        else:
            culprit = (
                f"the loss is {float(loss)} while every penalty is finite: the data term diverged "
                "(NaN/Inf in the inputs or labels, or a learning rate too large)"
            )
        self.model.stop_training = True
        raise FloatingPointError(
            f"Training stopped at epoch {step[0] + 1}, batch {step[1] + 1}: {culprit}. The weights of this "
            "batch are not saved."
        )


# ------------------------------------------------------------------------------------------ strength schedules


def linear_warmup(strength, epochs):
    """A schedule for `PenaltyStrengthScheduler`: `strength · min(1, (epoch + 1) / epochs)`.

    Warming a Jacobian penalty up over the first epochs is common practice (a full-strength penalty on an
    untrained network mostly flattens it before it fits the data).
    """
    strength = validation.strength(strength)
    epochs = validation.positive_int(epochs, "epochs")
    return lambda epoch, current: strength * min(1.0, (epoch + 1) / epochs)


class PenaltyStrengthScheduler(keras.callbacks.Callback):
    """Sets a penalty's strength at the start of every epoch, like `keras.callbacks.LearningRateScheduler`.

    A penalty's strength is a variable the compiled step reads, so the new value takes effect at once, without
    retracing. The strength in use is logged as `<name>_strength` (History, progress bar, TensorBoard).

    Args:
        penalty: the name of one of the model's compiled penalties.
        schedule: `schedule(epoch, current_strength) -> strength` (0-based epoch), e.g. `linear_warmup(0.1, 5)`.

    Example:

    ```python
    model.compile("adam", loss, regularizers=["input_gradient:0"])
    model.fit(x, y, epochs=10, callbacks=[
        keras_wssi.callbacks.PenaltyStrengthScheduler("input_gradient", keras_wssi.callbacks.linear_warmup(0.1, 5))])
    ```
    """

    def __init__(self, penalty, schedule):
        super().__init__()
        if not isinstance(penalty, str):
            raise TypeError(f"penalty must be the name of a compiled penalty (a str), got {penalty!r}.")
        if not callable(schedule):
            raise TypeError(f"schedule must be callable as schedule(epoch, strength), got {schedule!r}.")
        self.penalty_name = penalty
        self.schedule = schedule

    def _penalty(self):
        for penalty in getattr(self.model, "penalties", []):
            if penalty.name == self.penalty_name:
                return penalty
        names = [p.name for p in getattr(self.model, "penalties", [])]
        raise ValueError(f"PenaltyStrengthScheduler: the model has no penalty named {self.penalty_name!r}; it has {names}.")

    def on_epoch_begin(self, epoch, logs=None):
        penalty = self._penalty()
        value = self.schedule(epoch, penalty.strength)
        try:
            penalty.strength = value
        except (TypeError, ValueError) as error:
            raise ValueError(f"PenaltyStrengthScheduler: schedule({epoch}, ...) returned an invalid strength: {error}") from None

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[f"{self.penalty_name}_strength"] = self._penalty().strength
