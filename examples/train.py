r"""Trains a classifier on MNIST or Fashion-MNIST with keras_wssi penalties.

Every flag has a default, so a bare run trains the MLP with the WEISSI log-product penalty on MNIST:

    python examples/train.py                                # data through tensorflow-datasets (online)
    python examples/train.py --data_dir=../shared/data      # offline, from the raw IDX .gz files
    python examples/train.py --model=cnn --penalties=weissi:1e-3,l2:1e-5 --epochs=10 --output_dir=runs/cnn

Writes into --output_dir: `model.keras` (the trained keras_wssi.Model, carrying the data set and preprocessing
it was trained on), `metrics.json` (train/test accuracy and loss, generalization gap, penalty values, measured
input-gradient norm and its bound), `run.json` (the configuration), TensorBoard logs in `logs/`, per-epoch
weights in `checkpoints/`, and while it runs a `backup/` from which a killed run resumes: rerun the same
command. The backup is deleted only once every output is written. A different configuration on the same
--output_dir is refused (--fresh starts over, --resume_anyway continues the other run's backup).
"""

import json
import math
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging

# The flags are declared before TensorFlow is imported, so --help and flag errors answer in a second.
# These lists mirror keras_wssi.data.SUPPORTED_DATASETS and keras_wssi.architectures.ARCHITECTURES
# (tests/test_train_script.py checks that they agree).
DATASETS = ("fashion_mnist", "mnist")
MODELS = ("cnn", "mlp", "resnet")
CONVOLUTIONAL_MODELS = ("cnn", "resnet")

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "mnist", list(DATASETS), "Data set.")
flags.DEFINE_string("data_dir", None, "Folder with the raw IDX .gz files (offline). Default: $KERAS_WSSI_DATA_DIR, else tensorflow-datasets.")
flags.DEFINE_enum("model", "mlp", list(MODELS), "Architecture.")
flags.DEFINE_list("hidden_units", ["1024", "1024"], "Hidden layer widths of the MLP.")
flags.DEFINE_list(
    "penalties",
    ["weissi:1e-2"],
    "Penalties as name:strength, comma-separated (empty for none), e.g. weissi:1e-2,l2:1e-5. Names: "
    "keras_wssi.penalties.registered_penalties().",
)
flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd", "momentum"], "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_enum(
    "lr_schedule", "constant", ["constant", "cosine"], "Learning-rate schedule: constant, or cosine decay to 0 over training."
)
flags.DEFINE_integer("epochs", 5, "Epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling).")
flags.DEFINE_enum(
    "jit_compile", "auto", ["auto", "true", "false"],
    "XLA for the train step. auto: on the JAX backend always on (JAX compiles every step with XLA); on TensorFlow off "
    "under --deterministic (Keras disables XLA under op determinism), off for convolutional models on CPU (CNN plain "
    "step 53 ms with XLA vs 27 ms without, docs/benchmarks.md), on otherwise (dense-only models; GPU/TPU).",
)
flags.DEFINE_boolean(
    "deterministic", False,
    "Bit-reproducible runs: TensorFlow's deterministic ops (the model on TensorFlow, the tf.data input pipeline on "
    "every backend); on JAX the compiled CPU step is deterministic already.",
)
flags.DEFINE_string("output_dir", "runs/default", "Where checkpoints, logs, the model and metrics go.")
flags.DEFINE_integer("train_examples", 0, "Use only the first N training examples (0: all).")
flags.DEFINE_integer("test_examples", 0, "Use only the first N test examples (0: all).")
flags.DEFINE_integer("jacobian_examples", 500, "Test examples on which ||J(x)||_2 is measured.")
flags.DEFINE_enum("progress", "auto", ["auto", "bar", "epoch", "none"], "Progress output (auto: a bar on a terminal, else one line per epoch).")
flags.DEFINE_boolean("verbose", False, "Show TensorFlow's own start-up and device-probe logs (hidden by default).")
flags.DEFINE_boolean("fresh", False, "Discard this --output_dir's backup, checkpoints and outputs and start over.")
flags.DEFINE_boolean("resume_anyway", False, "Resume a backup written by a different configuration.")

for _name in ("epochs", "batch_size"):
    flags.register_validator(_name, lambda value: value >= 1, message=f"--{_name} must be >= 1.")
for _name in ("train_examples", "test_examples", "jacobian_examples"):
    flags.register_validator(_name, lambda value: value >= 0, message=f"--{_name} must be >= 0.")
flags.register_validator("learning_rate", lambda value: value > 0, message="--learning_rate must be > 0.")
flags.register_validator(
    "hidden_units",
    lambda values: all(v.strip().isdigit() and int(v) > 0 for v in values),
    message="--hidden_units must be positive integers.",
)
flags.register_validator(
    "penalties",
    lambda values: all(_penalty_syntax_error(v) is None for v in values),
    message="--penalties entries must be name:strength with a finite non-negative strength (see the entry below).",
)


def _penalty_syntax_error(spec):
    spec = spec.strip()
    if not spec:
        return None
    name, _, strength = spec.partition(":")
    if not name.replace("_", "").isalnum():
        return f"--penalties entry {spec!r}: the name must be letters, digits and underscores."
    if strength:
        try:
            value = float(strength)
        except ValueError:
            return f"--penalties entry {spec!r}: strength {strength!r} is not a number."
        if not math.isfinite(value) or value < 0:
            return f"--penalties entry {spec!r}: strength must be a finite non-negative number."
    return None


class ScriptError(Exception):
    """A failure the user can fix; main prints its message alone (no traceback, no usage text)."""


# Output lines of a healthy run must not contain these (tests/test_train_script.py checks it).
ALARMING = ("failed call to cuInit", "Unknown", "ran out of data", "Traceback", "UserWarning", "WARNING", "E0000")


def _import_heavy(verbose):
    """Imports TensorFlow, Keras and keras_wssi; without --verbose their start-up chatter is discarded.

    TensorFlow's C++ side prints device probes (`failed call to cuInit` on a machine without a GPU,
    oneDNN and CUDA-driver notices) through absl before any Python logging setting applies: the only
    reliable way to keep a healthy run quiet is to point file descriptor 2 elsewhere during the import.
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    saved = None
    if not verbose:
        sys.stderr.flush()
        saved = os.dup(2)
        log = open(os.devnull, "w")
        os.dup2(log.fileno(), 2)
    try:
        import keras
        import numpy as np
        import tensorflow as tf

        import keras_wssi as kw

        tf.config.list_physical_devices("GPU")  # The device probes, while their messages are discarded.
        kw.backend.accelerators()
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.close()
    if not verbose:
        tf.get_logger().setLevel("ERROR")
        logging.set_verbosity(logging.WARNING)  # TensorFlow's Python side logs checkpoint INFO lines through absl.
    return kw, keras, np, tf


def resolve_jit_compile(flag, model_name, deterministic, accelerators, backend="tensorflow"):
    """The XLA decision and its reason: `--jit_compile=auto` resolved by the documented rule (`keras_wssi.xla.RULE`;
    of the built-in architectures, CONVOLUTIONAL_MODELS are the ones `keras_wssi.xla.has_convolutions` finds
    convolutions in — checked by tests/test_xla.py). The rule was measured on TensorFlow; on JAX, `auto` is always
    on: without `jax.jit` Keras runs the JAX step op by op, and the compiled CPU step is deterministic."""
    if backend == "jax":
        if flag == "auto":
            return True, "on (auto): the JAX backend compiles every step with XLA"
        return flag == "true", f"{'on' if flag == 'true' else 'off'}: forced by --jit_compile={flag}"
    if deterministic:
        if flag == "true":
            return False, "off: --deterministic (Keras disables XLA under op determinism)"
        return False, "off (auto): --deterministic, under which Keras disables XLA"
    if flag != "auto":
        return flag == "true", f"{'on' if flag == 'true' else 'off'}: forced by --jit_compile={flag}"
    if accelerators:
        return True, f"on (auto): {', '.join(accelerators)} present"
    if model_name in CONVOLUTIONAL_MODELS:
        return False, "off (auto): convolutional model on CPU (XLA slows convolutions there: 53 vs 27 ms/step)"
    return True, "on (auto): dense-only model (XLA speeds dense steps on CPU: 10.5 vs 12.9 ms/step)"


def make_optimizer(keras, name, learning_rate, schedule="constant", total_steps=1):
    if schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps))
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)


def atomic_write_json(path, payload):
    """Writes JSON to a temporary file, then renames: readers never see a half-written file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def data_metrics(keras, np, model, images, labels, batch_size):
    """Accuracy and mean cross-entropy of the data term alone (no penalties), in inference mode."""
    logits = model.predict(images, batch_size=max(batch_size, 512), verbose=0)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return {
        "accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels)),
        "loss": float(np.mean(keras.ops.convert_to_numpy(loss))),
    }


def jacobian_statistics(kw, np, model, images):
    norms = kw.analysis.input_jacobian_spectral_norms(model, images)
    statistics = {
        "input_gradient_norm_mean": float(np.mean(norms)),
        "input_gradient_norm_max": float(np.max(norms)),
        "jacobian_examples": int(len(images)),
    }
    try:
        statistics["input_gradient_bound_spectral"] = kw.analysis.input_gradient_bound(model, norm="spectral")
        statistics["input_gradient_bound_frobenius"] = kw.analysis.input_gradient_bound(model, norm="frobenius")
    except kw.structure.StructureError as error:
        statistics["input_gradient_bound_note"] = str(error)
    return statistics


def run_config(penalties):
    """What makes two runs the same run: resuming one from the other's backup is refused unless it matches."""
    config = {
        "dataset": FLAGS.dataset,
        "model": FLAGS.model,
        "hidden_units": [int(v) for v in FLAGS.hidden_units] if FLAGS.model == "mlp" else None,
        "penalties": penalties,
        "optimizer": FLAGS.optimizer,
        "learning_rate": FLAGS.learning_rate,
        "lr_schedule": FLAGS.lr_schedule,
        "batch_size": FLAGS.batch_size,
        "seed": FLAGS.seed,
        "train_examples": FLAGS.train_examples,
        "deterministic": FLAGS.deterministic,
    }
    if FLAGS.lr_schedule == "cosine":  # The schedule's length depends on it; a constant rate may train longer.
        config["epochs"] = FLAGS.epochs
    import keras  # Already imported by train(); the backend is part of a run (recorded unless the default).

    backend = keras.backend.backend()
    if backend != "tensorflow":
        config["backend"] = backend
    return config


def _say(message):
    print(f"[train] {message}", flush=True)


def _fresh_start(output_dir):
    for name in ("backup", "checkpoints", "logs"):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    for name in ("model.keras", "metrics.json", "run.json"):
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


def train(output_dir=None):
    """Runs the training described by the flags; returns the metrics dict (also written to metrics.json)."""
    output_dir = output_dir or FLAGS.output_dir
    kw, keras, np, tf = _import_heavy(FLAGS.verbose)
    penalties = []
    for spec in (s.strip() for s in FLAGS.penalties):
        if spec:
            try:
                penalties.append(kw.penalties.get(spec))
            except (ValueError, TypeError) as error:
                raise ScriptError(f"--penalties entry {spec!r}: {error}") from None
    penalty_specs = [s.strip() for s in FLAGS.penalties if s.strip()]
    config = run_config(penalty_specs)

    model_path = os.path.join(output_dir, "model.keras")
    metrics_path = os.path.join(output_dir, "metrics.json")
    run_path = os.path.join(output_dir, "run.json")
    if FLAGS.fresh and os.path.isdir(output_dir):
        _fresh_start(output_dir)
        _say(f"--fresh: removed the previous backup, checkpoints and outputs in {output_dir}.")
    finished = all(os.path.exists(p) for p in (run_path, metrics_path, model_path))
    if finished and not os.path.exists(os.path.join(output_dir, "backup")):
        with open(run_path) as handle:
            previous = json.load(handle)
        if previous == config:
            _say(f"{output_dir} already holds this run's finished outputs ({model_path}, {metrics_path}); "
                 "pass --fresh to train again.")
            with open(metrics_path) as handle:
                return json.load(handle)
        if not FLAGS.resume_anyway:
            differences = "; ".join(
                f"{k}: finished run {previous.get(k)!r}, this run {config.get(k)!r}"
                for k in sorted(set(previous) | set(config)) if previous.get(k) != config.get(k)
            )
            raise ScriptError(
                f"{output_dir} holds the finished outputs of a different configuration ({differences}). Pass --fresh "
                "to replace them, or choose another --output_dir."
            )

    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    jit_compile, jit_reason = resolve_jit_compile(
        FLAGS.jit_compile, FLAGS.model, FLAGS.deterministic, kw.backend.accelerators(), backend=kw.backend.BACKEND
    )

    try:
        train_images, train_labels = kw.data.load_arrays(FLAGS.dataset, "train", data_dir=FLAGS.data_dir)
        test_images, test_labels = kw.data.load_arrays(FLAGS.dataset, "test", data_dir=FLAGS.data_dir)
    except kw.data.DataError as error:
        raise ScriptError(str(error)) from None
    if FLAGS.train_examples:
        train_images, train_labels = train_images[: FLAGS.train_examples], train_labels[: FLAGS.train_examples]
    if FLAGS.test_examples:
        test_images, test_labels = test_images[: FLAGS.test_examples], test_labels[: FLAGS.test_examples]
    _say(
        f"{FLAGS.model} on {FLAGS.dataset} ({len(train_images)} train / {len(test_images)} test examples), "
        f"penalties {', '.join(penalty_specs) or 'none'}, {FLAGS.epochs} epochs of batch {FLAGS.batch_size}; "
        f"Keras backend {kw.backend.BACKEND}; XLA {jit_reason}."
    )
    _say(f"outputs go to {os.path.abspath(output_dir)} (backup/ lets a killed run resume: rerun the same command).")

    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # Temporary files of a run killed while writing them (never an output).
        if ".tmp-" in name and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    # The order of epoch e depends on (seed, e) only, so a resumed run sees the same batches as an
    # uninterrupted one.
    train_pipeline = kw.data.EpochShuffledPipeline(train_images, train_labels, FLAGS.batch_size, seed=FLAGS.seed)
    test_data = kw.data.make_pipeline(test_images, test_labels, FLAGS.batch_size)

    kwargs = {"hidden_units": tuple(int(v) for v in FLAGS.hidden_units)} if FLAGS.model == "mlp" else {}
    model = kw.architectures.build(FLAGS.model, input_shape=train_images.shape[1:], num_classes=10, **kwargs)
    model.compile(
        optimizer=make_optimizer(
            keras, FLAGS.optimizer, FLAGS.learning_rate, FLAGS.lr_schedule,
            total_steps=FLAGS.epochs * train_pipeline.num_batches,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        regularizers=penalties,
        jit_compile=jit_compile,
    )
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    backup = kw.callbacks.ResumableBackup(
        os.path.join(output_dir, "backup"), config=config, on_mismatch="resume" if FLAGS.resume_anyway else "raise"
    )
    callbacks = [
        # First, so that a non-finite step stops the run before any epoch-end callback writes anything.
        kw.callbacks.TerminateOnNonFinite(),
        kw.callbacks.CheckLabels(train_labels, num_classes=10),
        kw.callbacks.SetPipelineEpoch(train_pipeline),
        # The epoch's weights file before its backup: a run resumed from a backup never lacks an earlier file.
        kw.callbacks.AtomicWeightsCheckpoint(os.path.join(checkpoint_dir, "epoch{epoch:03d}.weights.h5")),
        backup,
        keras.callbacks.TensorBoard(os.path.join(output_dir, "logs"), histogram_freq=0),
    ]
    progress = FLAGS.progress
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "epoch"
    start = time.time()
    try:
        history = model.fit(
            train_pipeline.dataset, validation_data=test_data, epochs=FLAGS.epochs, callbacks=callbacks,
            verbose={"bar": 1, "epoch": 2, "none": 0}[progress],
            shuffle=False,  # The pipeline shuffles every epoch itself.
        )
    except kw.callbacks.BackupMismatchError as error:
        raise ScriptError(
            f"{error} Rerun with --fresh to discard it and start over, or with --resume_anyway to continue from it."
        ) from None
    except (FloatingPointError, ValueError) as error:
        raise ScriptError(str(error)) from None
    seconds = time.time() - start
    kw.callbacks.crash_point("after_fit")

    last_logs = {k: v[-1] for k, v in history.history.items() if v} or (backup.restored_logs or {})
    train_metrics = data_metrics(keras, np, model, train_images, train_labels, FLAGS.batch_size)
    test_metrics = data_metrics(keras, np, model, test_images, test_labels, FLAGS.batch_size)
    metrics = {
        "dataset": FLAGS.dataset,
        "preprocessing": kw.data.PREPROCESSING,
        "model": FLAGS.model,
        "penalties": [kw.penalties.serialize(p)["config"] | {"class_name": type(p).__name__} for p in penalties],
        "epochs": FLAGS.epochs,
        "seed": FLAGS.seed,
        "jit_compile": jit_compile,
        "resumed_after_epoch": backup.restored_epoch,
        "train_seconds": seconds,
        "train_accuracy": train_metrics["accuracy"],
        "train_loss": train_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "generalization_gap_accuracy": train_metrics["accuracy"] - test_metrics["accuracy"],
        "generalization_gap_loss": test_metrics["loss"] - train_metrics["loss"],
        "penalty_values": {p.name: float(last_logs[p.name]) for p in penalties if p.name in last_logs},
    }
    metrics.update(jacobian_statistics(kw, np, model, test_images[: FLAGS.jacobian_examples]))

    # Every output is written before the backup goes: a kill anywhere up to here resumes from the backup.
    try:
        kw.callbacks.check_finite_state(model, model_path)
    except FloatingPointError as error:
        raise ScriptError(str(error)) from None
    atomic_write_json(run_path, config)
    temporary = f"{model_path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(temporary)
    kw.data.write_description(temporary, kw.data.describe(FLAGS.dataset))
    kw.callbacks.crash_point("model_written")
    os.replace(temporary, model_path)
    atomic_write_json(metrics_path, metrics)
    kw.callbacks.crash_point("outputs_written")
    backup.delete()
    _say(f"wrote {model_path} and {metrics_path}: test accuracy {metrics['test_accuracy']:.4f}.")
    return metrics


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value; see --help).")
    try:
        metrics = train()
    except ScriptError as error:
        _fail(str(error))
    print(json.dumps({k: v for k, v in metrics.items() if k != "penalties"}, indent=2, sort_keys=True))


def _fail(message):
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _help_requested(argv):
    return any(a in ("-h", "--help", "-help", "--helpshort", "-?", "--helpfull") for a in argv[1:])


if __name__ == "__main__":
    if _help_requested(sys.argv):
        # absl exits with status 1 after --help; asking for help is not an error.
        print(__doc__)
        print(FLAGS.main_module_help() if "--helpfull" not in sys.argv else FLAGS.get_help())
        sys.exit(0)
    try:
        FLAGS(sys.argv)
    except flags.Error as error:
        bad = [_penalty_syntax_error(s) for a in sys.argv[1:] if a.startswith("--penalties=")
               for s in a.split("=", 1)[1].split(",")]
        _fail("; ".join([str(error)] + [b for b in bad if b]) + " (see --help)")
    app.run(main, argv=sys.argv)
