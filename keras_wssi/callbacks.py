"""Callbacks: slope logging and early stopping on it; crash-safe backups; non-finite and label guards.

Johansson, Engsner, Strannegård, Mostad, "Slope and generalization properties of neural networks"
(arXiv 2107.01473) measure the slope `σ_max(∂logits/∂x)` on a fixed set of training points every epoch.
`SlopeLogger` does that and writes the summary into the epoch logs (so it lands in `History`, the progress
bar and any later callback) and, with `log_dir`, a TensorBoard histogram. `SlopeEarlyStopping` stops on it.

Training that survives kills, corruption and divergence: `ResumableBackup` keeps backups of every variable
(model, optimizer, penalty state) with the epoch and the run's configuration — `tf.train.CheckpointManager` on
TensorFlow, fsynced and checksummed array files of the same layout on JAX — and resumes from the newest
readable one; `TerminateOnNonFinite` stops at the first step whose loss, penalties,
weights or optimizer state stop being finite, naming the cause; `CheckLabels` refuses labels outside the
model's classes before the first step (XLA would turn them into NaN silently); `AtomicWeightsCheckpoint`
writes per-epoch weights that are complete and finite, or nothing.

On JAX, Keras keeps the training state in arrays during an epoch and writes it back into the variables when a
callback reads `self.model` (and at every epoch end). Every callback here reads and assigns variables only
through `self.model`, so the guards see the current weights and an assigned strength reaches the next step; a
callback of your own that reads or assigns other variables mid-epoch must do the same (`penalty.strength = value`
writes the model's state back itself, so it works on a penalty object kept aside too).
"""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_wssi import backend
from keras_wssi import validation
from keras_wssi.analysis.slope import slope as measure_slope
from keras_wssi.labels import class_indices

__all__ = [
    "AtomicWeightsCheckpoint",
    "PenaltyStrengthScheduler",
    "BackupMismatchError",
    "CheckLabels",
    "ResumableBackup",
    "SetPipelineEpoch",
    "SlopeEarlyStopping",
    "SlopeLogger",
    "TerminateOnNonFinite",
    "linear_warmup",
    "check_finite_state",
    "crash_point",
    "is_chief",
    "training_state_variables",
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
        every = validation.positive_int(every, "every")
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
        min_delta = validation.non_negative_float(min_delta, "min_delta")
        patience = validation.positive_int(patience, "patience")
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



# ----------------------------------------------------------------------------------------------------------
# Test hook: deterministic crash points.

CRASH_POINT_ENV = "KERAS_WSSI_CRASH_AT"
_crash_counts = {}


def crash_point(name):
    """Kills this process with SIGKILL when `$KERAS_WSSI_CRASH_AT` names this point (a test hook).

    `KERAS_WSSI_CRASH_AT=name` kills at the first time the point is reached, `name:k` at the k-th time. The
    points are named where they sit (`train_batch`, `backup_written`, `weights_checkpoint_written`, and the
    ones `examples/train.py` declares), so a test can kill a run at an exact place without sleeps or races and
    check that rerunning the same command ends where an uninterrupted run ends. Unset, it does nothing.

    Example:

    ```python
    crash_point("model_written")   # KERAS_WSSI_CRASH_AT=model_written kills the process here
    ```
    """
    spec = os.environ.get(CRASH_POINT_ENV, "")
    target, _, count = spec.partition(":")
    if not spec or target != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(count or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------
# The state of a run, and checking that it is finite.


def training_state_variables(model):
    """Every variable a resumed run needs: the model's (trainable and not, penalty state included: a
    `keras_wssi.Model` tracks its penalties' variables) and the optimizer's, each listed once.

    Example:

    ```python
    variables = keras_wssi.callbacks.training_state_variables(model)   # after model.compile(...)
    ```
    """
    found, seen = [], set()
    candidates = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        candidates += list(model.optimizer.variables)
    for variable in candidates:
        if id(variable) not in seen:
            seen.add(id(variable))
            found.append(variable)
    return found


def _variable_name(variable):
    return getattr(variable, "path", None) or getattr(variable, "name", "?")


def _finite_flags(values):
    return keras.ops.stack([keras.ops.all(keras.ops.isfinite(v)) for v in values])


_COMPILED_FINITE_FLAGS = []


def _compiled_finite_flags():
    if not _COMPILED_FINITE_FLAGS:
        _COMPILED_FINITE_FLAGS.append(backend.function(_finite_flags, jit_compile=True))
    return _COMPILED_FINITE_FLAGS[0]


class _FiniteCheck:
    """One compiled function that reports, per floating-point variable, whether all its entries are finite.

    It reads the variables' current values on every call (`keras_wssi.backend.function`); on JAX, callers pass
    through `Callback.model` first, which writes the step's state back into the variables."""

    def __init__(self, variables):
        self.variables = [v for v in variables if keras.backend.is_float_dtype(keras.backend.standardize_dtype(v.dtype))]
        self.count = len(variables)
        self.ids = [id(v) for v in variables]

        if backend.BACKEND == "tensorflow":  # A graph reading the variables by reference.
            self._flags = backend.function(lambda: _finite_flags(self.variables), variables=self.variables, jit_compile=False)
        else:  # One jax.jit for every check, fed the current values: models of equal shapes share its compilation.
            self._flags = lambda: _compiled_finite_flags()([v.value for v in self.variables])

    def non_finite(self):
        if not self.variables:
            return []
        flags = keras.ops.convert_to_numpy(self._flags())
        return [_variable_name(v) for v, ok in zip(self.variables, flags) if not ok]


# One compiled check per model, shared by every callback and `check_finite_state` (on JAX each new check is one
# more XLA compilation).
_FINITE_CHECKS = weakref.WeakKeyDictionary()


def _finite_check(model):
    variables = training_state_variables(model)
    check = _FINITE_CHECKS.get(model)
    if check is None or check.ids != [id(v) for v in variables]:
        check = _FINITE_CHECKS[model] = _FiniteCheck(variables)
    return check


def check_finite_state(model, what):
    """Raises `FloatingPointError` when a weight, optimizer or penalty variable of `model` holds NaN/Inf.

    Called before anything is written (backups, checkpoints, the final model), so that nothing non-finite is
    ever saved. `what` names the file about to be written, for the message.

    Example:

    ```python
    keras_wssi.callbacks.check_finite_state(model, "model.keras")
    model.save("model.keras")
    ```
    """
    bad = _finite_check(model).non_finite()
    if bad:
        raise FloatingPointError(
            f"Refusing to write {what}: {len(bad)} variable(s) hold NaN/Inf ({', '.join(bad[:3])}"
            f"{', …' if len(bad) > 3 else ''}). Nothing was written."
        )


def _as_float(value):
    return float(np.asarray(keras.ops.convert_to_numpy(value) if keras.ops.is_tensor(value) else value))


# Gradients beyond sqrt(float32 max) ≈ 1.8e19 square to Inf in an optimizer's second moment (Adam, RMSprop).
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SAFE_TERM = math.sqrt(_FLOAT32_MAX)


def _penalty_terms(model, logs):
    """(name, strength, value, strength × value in float32) for every penalty logged in `logs`."""
    terms = []
    for penalty in getattr(model, "penalties", []):
        if penalty.name not in logs:
            continue
        strength = _as_float(penalty.strength)
        value = _as_float(logs[penalty.name])
        with np.errstate(over="ignore", invalid="ignore"):
            product = float(np.float32(strength) * np.float32(value))
        terms.append((penalty.name, strength, value, product))
    return terms


def _blame(model, logs, state_only):
    """Names the cause of a divergence from the step's logs: a penalty, `strength × value`, or the data term."""
    terms = _penalty_terms(model, logs)
    for name, strength, value, _ in terms:
        if not math.isfinite(value):
            return f"penalty {name!r} is {value} (strength {strength:g})"
    for name, strength, value, product in terms:
        if not math.isfinite(product):
            return (
                f"penalty {name!r}: strength {strength:g} × value {value:g} overflows float32 (max {_FLOAT32_MAX:.3g}); "
                "lower its strength"
            )
    loss = logs.get("loss")
    loss = None if loss is None else _as_float(loss)
    for name, strength, value, product in terms:
        if abs(product) > _SAFE_TERM and (loss is None or not math.isfinite(loss) or abs(product) >= 0.5 * abs(loss)):
            return (
                f"penalty {name!r}: strength {strength:g} × value {value:g} = {product:.3g} dominates the loss, and "
                f"gradients of that size overflow float32 in the update (their square exceeds {_FLOAT32_MAX:.3g}); "
                "lower its strength"
            )
    where = "the update made the state non-finite while the loss stayed finite" if state_only else f"the loss is {loss}"
    return (
        f"the data term: {where} and every penalty term is finite and moderate (NaN/Inf in the inputs or labels, "
        "e.g. a NaN pixel that ReLU hides in the forward pass but not in the gradient, or a learning rate too large)"
    )


class TerminateOnNonFinite(keras.callbacks.Callback):
    """Stops `fit` at the first step whose loss, penalty values, weights or optimizer state are NaN/Inf.

    Keras's `TerminateOnNaN` reads only the loss, which is computed *before* the update: a NaN pixel that a
    ReLU hides in the forward pass still makes the gradient (and so the weights) NaN, and an Adam second
    moment overflows to Inf while every logged loss stays finite. This callback checks, after every
    `check_every`-th batch and at every epoch end, the batch logs and every variable of the run (weights,
    optimizer slots, penalty state) in one compiled function, and at epoch end also the validation logs
    (`val_*`). It raises `FloatingPointError` naming the epoch, the batch and the cause — the penalty whose
    value is non-finite, a `strength × value` that overflows float32 or dominates the loss beyond what an
    update survives, or the data term — before any later callback (put it first) writes anything.

    Args:
        check_every: check the variables after every this many batches (1: every batch, the cost of reading
            the weights once; the logs are checked after every batch regardless).

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_wssi.callbacks.TerminateOnNonFinite(), checkpoint_callback])
    ```
    """

    def __init__(self, check_every=1):
        super().__init__()
        check_every = validation.positive_int(check_every, "check_every")
        self.check_every = check_every
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _non_finite_state(self):
        return _finite_check(self.model).non_finite()  # `self.model`: on JAX, writes the step's state back first.

    def _stop(self, where, culprit):
        self.model.stop_training = True
        raise FloatingPointError(
            f"Training stopped at epoch {self._epoch + 1}{where}: {culprit}. Nothing from this step on was saved."
        )

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        crash_point("train_batch")
        where = f", batch {batch + 1}"
        if not all(math.isfinite(_as_float(v)) for v in logs.values() if np.size(v) == 1):
            self._stop(where, _blame(self.model, logs, state_only=False))
        if (batch + 1) % self.check_every == 0:
            bad = self._non_finite_state()
            if bad:
                self._stop(where, f"{_blame(self.model, logs, state_only=True)}; non-finite: {', '.join(bad[:3])}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        bad = self._non_finite_state()
        if bad:
            self._stop(" (end)", f"{_blame(self.model, logs, state_only=True)}; non-finite: {', '.join(bad[:3])}")
        bad_logs = sorted(k for k, v in logs.items() if np.size(v) == 1 and not math.isfinite(_as_float(v)))
        if bad_logs:
            training = [k for k in bad_logs if not k.startswith("val_")]
            if training:
                self._stop(" (end)", _blame(self.model, logs, state_only=False))
            self._stop(
                " (validation)",
                f"{', '.join(f'{k} = {_as_float(logs[k])}' for k in bad_logs)} while every weight is finite: the "
                "validation data contains NaN/Inf (or labels the loss cannot score)",
            )


class CheckLabels(keras.callbacks.Callback):
    """Refuses, once per `fit`, labels outside `[0, num_classes)` before the first step.

    Sparse cross-entropy on a label ≥ the number of classes is an error in eager TensorFlow but a silent NaN
    under `jit_compile=True` (XLA's gather returns garbage for out-of-range indices, and asserts are not
    compiled). The check runs in Python at `on_train_begin`, so it holds whatever the compile settings.

    Args:
        labels: the training labels: class indices `(N,)` / `(N, 1)` or one-hot rows `(N, C)`, or a finite
            `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)` batches.
        num_classes: the number of classes; defaults to the size of the model's last output axis.

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_wssi.callbacks.CheckLabels(y)])
    ```
    """

    def __init__(self, labels, num_classes=None):
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}.")
        self.labels = labels
        self.num_classes = num_classes

    def _label_array(self):
        if isinstance(self.labels, tf.data.Dataset):
            return np.concatenate([np.asarray(batch[1]) for batch in self.labels.as_numpy_iterator()])
        return np.asarray(self.labels)

    def on_train_begin(self, logs=None):
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = int(self.model.outputs[0].shape[-1]) if getattr(self.model, "outputs", None) else None
        if num_classes is None:
            raise ValueError("CheckLabels needs num_classes for a model without a static output shape.")
        # The package's one label normalizer: sparse (N,) / (N, 1) or one-hot (N, C) labels as class indices.
        labels = class_indices(self._label_array(), argument="CheckLabels labels")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            raise ValueError(
                f"{len(bad)} label(s) fall outside [0, {num_classes}) (the model has {num_classes} classes): e.g. "
                f"label {labels[bad[0]].item()!r} at index {int(bad[0])}. Out-of-range labels give NaN under XLA; fix the "
                "labels or the model's output size."
            )


# ----------------------------------------------------------------------------------------------------------
# Crash-safe backups and checkpoints.


def is_chief(strategy=None):
    """Whether this process writes files under `strategy` (the chief, or worker 0 without a chief).

    Under `MultiWorkerMirroredStrategy` every worker computes the same values; only one writes them, so two
    processes never race on one file. Without a multi-worker strategy every process is the chief.

    Example:

    ```python
    if keras_wssi.callbacks.is_chief(model.distribute_strategy):
        model.save("model.keras")
    ```
    """
    if backend.BACKEND != "tensorflow":  # Multi-worker strategies are tf.distribute's; JAX has one process here.
        return True
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def _strategy(model):
    """The model's `tf.distribute` strategy (None on JAX, whose models have none)."""
    return getattr(model, "distribute_strategy", None)


class BackupMismatchError(RuntimeError):
    """Raised when a backup was written by a run with a different configuration."""


# What reading a damaged checkpoint raises (TensorFlow's bundle reader: DataLoss/NotFound/OutOfRange op errors,
# and IndexError for a data file shorter than its index says).
_UNREADABLE = (tf.errors.OpError, ValueError, KeyError, OSError, IndexError, RuntimeError)
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.index$")
_DATA_SUFFIX = ".data-00000-of-00001"
_ARRAY_FORMAT = "keras_wssi.array_backup.v1"
_POINTER_LINE = re.compile(r'^\s*([A-Za-z_]+)\s*:\s*"([^"\\]*)"\s*$')


def _fsync_directory(path):
    """Makes a rename in `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_atomically(path, payload):
    """Writes `payload` (bytes) to a temporary file, fsyncs it and renames it to `path`: all of it, or nothing."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _numpy_dtype(name):
    """The NumPy dtype named `name`, including ml_dtypes' (bfloat16, float8…) that NumPy does not know by name."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # Installed with JAX; Keras's low-precision dtypes come from it.

        return np.dtype(getattr(ml_dtypes, name))


class _ArrayBackups:
    """Backups of plain arrays, for backends whose variables `tf.train.Checkpoint` cannot save (JAX).

    The layout mirrors TensorFlow's: `ckpt-N.data-00000-of-00001` (every array's bytes, in order) and
    `ckpt-N.index` (JSON: the epoch, logs and configuration, each array's dtype, shape and offset, and the
    data file's size and SHA-256), plus a `checkpoint` pointer file in TensorFlow's text format. Each file
    is written to a temporary name, fsynced and renamed; the index is renamed last, so a backup is listed
    (`ckpt-N.index`) only once its data is complete, and reading one checks the size and checksum of all of it.
    """

    def __init__(self, directory, max_to_keep):
        self.directory = directory
        self.max_to_keep = max_to_keep

    def save(self, number, arrays, meta, on_written):
        os.makedirs(self.directory, exist_ok=True)
        prefix = os.path.join(self.directory, f"ckpt-{number}")
        entries, chunks, offset = [], [], 0
        for key, array in arrays:
            array = np.asarray(array)  # tobytes() is C order; ascontiguousarray would make 0-d arrays 1-d.
            payload = array.tobytes()
            entries.append({"key": key, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset})
            chunks.append(payload)
            offset += len(payload)
        payload = b"".join(chunks)
        index = dict(meta, format=_ARRAY_FORMAT, variables=entries, data_size=len(payload),
                     data_sha256=hashlib.sha256(payload).hexdigest())
        _write_atomically(prefix + _DATA_SUFFIX, payload)
        _write_atomically(prefix + ".index", json.dumps(index, sort_keys=True).encode())
        _fsync_directory(self.directory)
        on_written()
        return prefix

    @staticmethod
    def read(prefix):
        """`(index, arrays)` of a backup; raises ValueError/OSError when any part of it is missing or damaged."""
        with open(prefix + ".index", "rb") as handle:
            index = json.loads(handle.read().decode())
        if not isinstance(index, dict) or index.get("format") != _ARRAY_FORMAT:
            raise ValueError(f"{prefix}.index is not a keras_wssi backup index")
        with open(prefix + _DATA_SUFFIX, "rb") as handle:
            payload = handle.read()
        if len(payload) != index["data_size"]:
            raise ValueError(f"the data file has {len(payload)} bytes, its index promises {index['data_size']}")
        if hashlib.sha256(payload).hexdigest() != index["data_sha256"]:
            raise ValueError("the data file's SHA-256 differs from the one its index recorded")
        arrays = []
        try:
            for entry in index["variables"]:
                dtype, shape = _numpy_dtype(entry["dtype"]), tuple(entry["shape"])
                count = int(np.prod(shape, dtype=np.int64))
                array = np.frombuffer(payload, dtype=dtype, count=count, offset=entry["offset"]) if count else np.zeros(0, dtype)
                arrays.append(array.reshape(shape))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{prefix}.index does not describe its arrays ({type(error).__name__}: {error})") from error
        return index, arrays

    def write_pointer(self, prefixes):
        names = [os.path.basename(p) for p in prefixes]
        lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
        _write_atomically(os.path.join(self.directory, "checkpoint"), ("\n".join(lines) + "\n").encode())

    @staticmethod
    def read_pointer(directory):
        """The backup the pointer file names ("" when it names none); ValueError when it does not parse."""
        with open(os.path.join(directory, "checkpoint"), "rb") as handle:
            text = handle.read().decode()
        named = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            match = _POINTER_LINE.match(line)
            if match is None:
                raise ValueError(f"line {line[:40]!r} is not a checkpoint-state entry")
            if match.group(1) == "model_checkpoint_path":
                named = match.group(2)
        return named


class ResumableBackup(keras.callbacks.Callback):
    """Backs up a run after every epoch and resumes it from the newest readable backup.

    Each backup holds every variable of the run (`training_state_variables`: weights, optimizer slots and
    step, penalty state) plus the number of finished epochs, the epoch logs and the run's configuration. On
    TensorFlow it is a `tf.train.Checkpoint` written by `tf.train.CheckpointManager` (data first, then the
    `checkpoint` pointer, each atomically). On JAX, whose arrays `tf.train` cannot save, the same content goes
    into files of the same layout: `ckpt-N.data-00000-of-00001` (the arrays' bytes) and `ckpt-N.index` (JSON:
    epoch, logs, configuration, each array's dtype/shape/offset, the data's size and SHA-256), each written to
    a temporary file, fsynced and renamed (the index last, so a listed backup is complete), then the pointer.
    Before a backup is written the state is checked to be finite; after it, every tensor of it is read back
    (CRC- or SHA-256-checked), and the previous backup is kept (`max_to_keep=2`) until the next one has
    been. A backup in the other backend's format is refused with `BackupMismatchError`, never deleted. On restart (`on_train_begin`) the backups are tried newest first: one that cannot be read — a
    truncated file, a missing shard, a pointer naming nothing — is reported and deleted, and the previous
    one is used; a pointer that is empty, unparsable or points elsewhere is ignored (the folder's listing is
    the truth). A backup written by another configuration is refused with `BackupMismatchError` (or
    resumed with a warning when `on_mismatch="resume"`).

    Data position: a backup is taken at an epoch boundary, so the resumed run restarts at the next epoch; with
    a pipeline whose order depends on `(seed, epoch)` only (`keras_wssi.data.EpochShuffledPipeline`), it
    sees the same batches as an uninterrupted run and ends bit-identical under deterministic ops.

    Unlike `keras.callbacks.BackupAndRestore`, nothing is deleted when `fit` returns: call `delete()` once
    every output of the run is written. Under `MultiWorkerMirroredStrategy` only the chief writes.

    Args:
        backup_dir: the folder of the backups.
        config: a JSON-serializable description of the run (model, penalties, data, seed…); a backup whose
            description differs is not resumed silently. None skips the check.
        on_mismatch: `"raise"` (default) or `"resume"` (continue from the other run's backup, with a warning).
        max_to_keep: backups kept (≥ 2, so that a verified one always survives the next write).

    Example:

    ```python
    backup = keras_wssi.callbacks.ResumableBackup("run/backup", config={"penalties": ["weissi:1e-2"], "seed": 0})
    model.fit(pipeline.dataset, epochs=5, callbacks=[keras_wssi.callbacks.SetPipelineEpoch(pipeline), backup])
    model.save("run/model.keras")
    backup.delete()
    ```
    """

    def __init__(self, backup_dir, config=None, on_mismatch="raise", max_to_keep=2):
        super().__init__()
        if on_mismatch not in ("raise", "resume"):
            raise ValueError(f"on_mismatch must be 'raise' or 'resume', got {on_mismatch!r}.")
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 2:
            raise ValueError(f"max_to_keep must be an integer >= 2, got {max_to_keep!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.config_json = json.dumps(config, sort_keys=True, default=str) if config is not None else ""
        self.on_mismatch = on_mismatch
        self.max_to_keep = max_to_keep
        self.restored_epoch = None
        self.restored_logs = None
        self.messages = []
        self._manager = None

    @property
    def fingerprint(self):
        """A short hash of the configuration (empty without one)."""
        return hashlib.sha256(self.config_json.encode()).hexdigest()[:12] if self.config_json else ""

    def _say(self, message):
        self.messages.append(message)
        print(f"[backup] {message}", file=sys.stderr, flush=True)

    def _build_checkpoint(self):
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables = training_state_variables(model)
        self._variables = variables
        self._last_read = None
        if backend.BACKEND != "tensorflow":
            return  # Plain arrays in `_ArrayBackups` files: tf.train.Checkpoint cannot save JAX arrays.
        # Keyed by position, not by name: Keras numbers layer names per process (dense, dense_1, …), while the
        # order of the variables is fixed by the model and the configuration (which a backup records).
        state = {f"v{index:04d}": v for index, v in enumerate(variables)}
        with tf.device("/cpu:0"):
            self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="backup_epoch")
            self._config = tf.Variable("", dtype=tf.string, trainable=False, name="backup_config")
            self._logs = tf.Variable("{}", dtype=tf.string, trainable=False, name="backup_logs")
        self._checkpoint = tf.train.Checkpoint(state=state, epoch=self._epoch, config=self._config, logs=self._logs)
        self._checkpoint.save_counter  # Created now (it is lazy), so that reading a backup restores it too.

    def _listed(self):
        if not os.path.isdir(self.backup_dir):
            return []
        numbers = [int(m.group(1)) for m in map(_CHECKPOINT_NAME.match, os.listdir(self.backup_dir)) if m]
        return [os.path.join(self.backup_dir, f"ckpt-{n}") for n in sorted(numbers, reverse=True)]

    def _remove_backup(self, prefix):
        for name in os.listdir(self.backup_dir):
            if name == os.path.basename(prefix) + ".index" or name.startswith(os.path.basename(prefix) + ".data-"):
                os.remove(os.path.join(self.backup_dir, name))

    def _clean_leftovers(self):
        # TF writes a checkpoint's shards into `<prefix>_temp/` and renames them into place: a kill mid-write
        # leaves only such temporary entries, never a half-written `ckpt-N`.
        for name in os.listdir(self.backup_dir):
            path = os.path.join(self.backup_dir, name)
            if "_temp" in name or ".tmp" in name:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def _read_all(self, prefix):
        """Reads every tensor of a backup (CRC-checked by TensorFlow; SHA-256-checked on other backends); returns
        the stored config and epoch."""
        if backend.BACKEND != "tensorflow":
            index, arrays = _ArrayBackups.read(prefix)
            self._last_read = (index, arrays)
            return str(index["config"]), int(index["epoch"])
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
        config = reader.get_tensor("config/.ATTRIBUTES/VARIABLE_VALUE")
        epoch = int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
        return config.decode() if isinstance(config, bytes) else str(config), epoch

    def _check_format(self, prefix):
        """Refuses (never deletes) a backup in the other backend's format: TensorFlow's checkpoint bundle, or the
        JSON-indexed arrays written on JAX."""
        try:
            with open(prefix + ".index", "rb") as handle:
                head = handle.read(1)
        except OSError:
            return
        if not head:
            return  # An empty index is a damaged backup: the reader reports it.
        written = "jax" if head == b"{" else "tensorflow"
        ours = "tensorflow" if backend.BACKEND == "tensorflow" else "jax"
        if written != ours:
            raise BackupMismatchError(
                f"The backup {prefix} was written on the {written} backend and this run uses {backend.BACKEND}: resume "
                f"it with KERAS_BACKEND={written}, or remove {self.backup_dir} to start over."
            )

    def _mismatch_message(self, stored):
        try:
            old, new = json.loads(stored), json.loads(self.config_json)
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            differences = "; ".join(f"{k}: backup {old.get(k)!r}, this run {new.get(k)!r}" for k in keys)
        except (ValueError, TypeError, AttributeError):
            differences = f"backup {stored!r}, this run {self.config_json!r}"
        return f"The backup in {self.backup_dir} was written by a different configuration ({differences})."

    def _restore(self):
        if not os.path.isdir(self.backup_dir):
            return
        chief = is_chief(_strategy(self.model))  # Other workers read the backups, never change them.
        if chief:
            self._clean_leftovers()
        candidates = self._listed()
        pointer = os.path.join(self.backup_dir, "checkpoint")
        if os.path.exists(pointer):
            try:
                if backend.BACKEND == "tensorflow":
                    state = tf.train.get_checkpoint_state(self.backup_dir)
                    named = state.model_checkpoint_path if state is not None else ""
                else:
                    named = _ArrayBackups.read_pointer(self.backup_dir)
            except Exception as error:  # A text proto that does not parse: tf raises ParseError and friends.
                named = None
                self._say(f"the pointer file {pointer} is unreadable ({type(error).__name__}); using the folder's backups.")
            if named is not None and (not candidates or os.path.basename(named) != os.path.basename(candidates[0])):
                self._say(
                    f"the pointer file {pointer} names {named!r}, which is not the newest backup on disk "
                    f"({os.path.basename(candidates[0]) if candidates else 'none'}); using the folder's backups."
                )
        for index, prefix in enumerate(candidates):
            self._check_format(prefix)
            try:
                stored_config, epoch = self._read_all(prefix)
            except _UNREADABLE as error:
                following = os.path.basename(candidates[index + 1]) if index + 1 < len(candidates) else "starting fresh"
                self._say(
                    f"{os.path.basename(prefix)} is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                    f"deleting it and falling back to {following}."
                )
                if chief:
                    self._remove_backup(prefix)
                continue
            if self.config_json and stored_config != self.config_json:
                message = self._mismatch_message(stored_config)
                if self.on_mismatch == "raise":
                    raise BackupMismatchError(message)
                self._say(f"{message} Resuming it anyway, as asked.")
            if backend.BACKEND == "tensorflow":
                self._checkpoint.read(prefix).assert_existing_objects_matched()
                self.restored_logs = json.loads(self._logs.numpy().decode() or "{}")
            else:
                index, arrays = self._last_read
                self._assign(prefix, arrays)
                self.restored_logs = dict(index.get("logs") or {})
            self.restored_epoch = epoch
            self.model._initial_epoch = epoch
            self._say(f"resumed from {prefix} after epoch {epoch}.")
            break
        if chief:
            # The pointer file is rewritten to what is on disk, so CheckpointManager starts from the truth.
            if os.path.exists(pointer):
                os.remove(pointer)
            remaining = list(reversed(self._listed()))
            if remaining and backend.BACKEND != "tensorflow":
                _ArrayBackups(self.backup_dir, self.max_to_keep).write_pointer(remaining)
            elif remaining:
                # Timestamps after `last_preserved_timestamp`, so that the manager counts these backups towards
                # max_to_keep (it never deletes one older than that mark).
                now = time.time()
                tf.compat.v1.train.update_checkpoint_state(
                    self.backup_dir, remaining[-1], all_model_checkpoint_paths=remaining,
                    all_model_checkpoint_timestamps=[now] * len(remaining), last_preserved_timestamp=now - 1,
                )

    def on_train_begin(self, logs=None):
        self.restored_epoch = None
        self._build_checkpoint()
        self._restore()
        self._chief = is_chief(_strategy(self.model))
        directory = self.backup_dir if self._chief else os.path.join(self.backup_dir, f"_worker_{os.getpid()}")
        if backend.BACKEND == "tensorflow":
            self._manager = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=self.max_to_keep)
        else:
            self._manager = _ArrayBackups(directory, self.max_to_keep)

    def _assign(self, prefix, arrays):
        """Restores every variable of the run from a backup's arrays (JAX), refusing a backup of other shapes."""
        variables = self._variables
        if len(arrays) != len(variables) or any(tuple(a.shape) != tuple(v.shape) for a, v in zip(arrays, variables)):
            raise ValueError(
                f"{prefix} holds {len(arrays)} arrays that do not match this run's {len(variables)} variables "
                "(another model or optimizer): pass a configuration to ResumableBackup, or remove the backup."
            )
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    def on_epoch_end(self, epoch, logs=None):
        if not self._chief:
            return
        bad = _finite_check(self.model).non_finite()
        if bad:
            raise FloatingPointError(
                f"Refusing to write the backup of epoch {epoch + 1}: {', '.join(bad[:3])} hold NaN/Inf. The previous "
                "backup is kept."
            )
        scalars = {k: _as_float(v) for k, v in (logs or {}).items() if np.size(v) == 1}
        if backend.BACKEND != "tensorflow":
            self._save_arrays(epoch, scalars)
            return
        self._epoch.assign(epoch + 1)
        self._config.assign(self.config_json)
        self._logs.assign(json.dumps(scalars))
        options = tf.train.CheckpointOptions(experimental_write_callbacks=[lambda path: crash_point("backup_written")])
        prefix = self._manager.save(checkpoint_number=epoch + 1, options=options)
        try:
            self._read_all(prefix)
        except _UNREADABLE as error:
            raise OSError(f"The backup {prefix} could not be read back ({error}); the previous one is kept.") from error

    def _save_arrays(self, epoch, scalars):
        """The JAX backup: written and fsynced, read back and checked, then pointed at; the oldest beyond
        `max_to_keep` are removed only after that."""
        arrays = [(f"v{index:04d}", np.asarray(keras.ops.convert_to_numpy(v))) for index, v in enumerate(self._variables)]
        meta = {"epoch": epoch + 1, "config": self.config_json, "logs": scalars}
        prefix = self._manager.save(epoch + 1, arrays, meta, on_written=lambda: crash_point("backup_written"))
        try:
            _, stored = _ArrayBackups.read(prefix)
            if any(not np.array_equal(a, b) for (_, a), b in zip(arrays, stored)):
                raise ValueError("the arrays read back differ from the ones written")
        except _UNREADABLE as error:
            raise OSError(f"The backup {prefix} could not be read back ({error}); the previous one is kept.") from error
        kept = list(reversed(self._listed()))
        self._manager.write_pointer(kept[-self.max_to_keep:])
        for old in kept[: -self.max_to_keep]:
            self._remove_backup(old)

    def delete(self):
        """Removes the backups: call it once every output of the run is written."""
        if self._manager is None or self._chief:
            shutil.rmtree(self.backup_dir, ignore_errors=True)


class AtomicWeightsCheckpoint(keras.callbacks.Callback):
    """Saves the weights after every epoch to `filepath.format(epoch=...)`: complete and finite, or nothing.

    The weights are checked to be finite (`check_finite_state`), written to a temporary file and renamed, so
    an interrupted run never leaves a half-written checkpoint and a diverged one never leaves a NaN one.
    Under `MultiWorkerMirroredStrategy` only the chief writes.

    Example:

    ```python
    model.fit(x, y, epochs=3, callbacks=[keras_wssi.callbacks.AtomicWeightsCheckpoint("ckpt/e{epoch:03d}.weights.h5")])
    ```
    """

    def __init__(self, filepath):
        super().__init__()
        if not filepath.endswith(".weights.h5"):
            raise ValueError(f"filepath must end in '.weights.h5', got {filepath!r}.")
        self.filepath = filepath

    def on_train_begin(self, logs=None):
        # A run killed while writing leaves only a temporary file behind: remove those, never a checkpoint.
        folder = os.path.dirname(self.filepath) or "."
        if os.path.isdir(folder) and is_chief(_strategy(self.model)):
            for name in os.listdir(folder):
                if ".tmp-" in name and name.endswith(".weights.h5"):
                    os.remove(os.path.join(folder, name))

    def on_epoch_end(self, epoch, logs=None):
        if not is_chief(_strategy(self.model)):
            return
        path = self.filepath.format(epoch=epoch + 1, **(logs or {}))
        check_finite_state(self.model, path)
        temporary = f"{path[: -len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5"
        self.model.save_weights(temporary)
        crash_point("weights_checkpoint_written")
        os.replace(temporary, path)


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
