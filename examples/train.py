r"""Trains a classifier on MNIST or Fashion-MNIST with keras_wssi penalties.

Every flag has a default, so a bare run trains the MLP with the WEISSI log-product penalty on MNIST:

    python examples/train.py                                # data through tensorflow-datasets (online)
    python examples/train.py --data_dir=../shared/data      # offline, from the raw IDX .gz files
    python examples/train.py --model=cnn --penalties=weissi:1e-3,l2:1e-5 --epochs=10 --output_dir=runs/cnn

Writes into --output_dir: `model.keras` (the trained keras_wssi.Model), `metrics.json` (train/test accuracy
and loss, generalization gap, penalty values, measured input-gradient norm and its bound), TensorBoard logs
in `logs/`, per-epoch weights in `checkpoints/`, and a `backup/` that lets an interrupted run resume where
it stopped (run the same command again). Files are written to a temporary name and renamed, so a killed run
never leaves a half-written output.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_wssi as kw  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "mnist", list(kw.data.SUPPORTED_DATASETS), "Data set.")
flags.DEFINE_string(
    "data_dir", None, f"Folder with the raw IDX .gz files (offline). Default: ${kw.data.DATA_DIR_ENV}, else tensorflow-datasets."
)
flags.DEFINE_enum("model", "mlp", list(kw.architectures.ARCHITECTURES), "Architecture.")
flags.DEFINE_list("hidden_units", ["1024", "1024"], "Hidden layer widths of the MLP.")
flags.DEFINE_list(
    "penalties",
    ["weissi:1e-2"],
    "Penalties as name:strength, comma-separated (empty for none). Names: "
    + ", ".join(sorted(kw.penalties.registered_penalties())),
)
flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd", "momentum"], "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_enum(
    "lr_schedule", "constant", ["constant", "cosine"], "Learning-rate schedule: constant, or cosine decay to 0 over training."
)
flags.DEFINE_integer("epochs", 5, "Epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling).")
flags.DEFINE_boolean("jit_compile", True, "Compile the train step with XLA.")
flags.DEFINE_boolean("deterministic", False, "Enable TensorFlow deterministic ops (bit-reproducible runs).")
flags.DEFINE_string("output_dir", "runs/default", "Where checkpoints, logs, the model and metrics go.")
flags.DEFINE_integer("train_examples", 0, "Use only the first N training examples (0: all).")
flags.DEFINE_integer("test_examples", 0, "Use only the first N test examples (0: all).")
flags.DEFINE_integer("jacobian_examples", 500, "Test examples on which ||J(x)||_2 is measured.")
flags.DEFINE_integer("verbose", 1, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")

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


def parse_penalties(specs):
    """`["weissi:1e-4", "l2:1e-5"]` → penalty objects; raises `app.UsageError` naming the bad entry."""
    penalties = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        try:
            penalties.append(kw.penalties.get(spec))
        except (ValueError, TypeError) as error:
            raise app.UsageError(f"--penalties entry {spec!r}: {error}") from None
    return penalties


def make_optimizer(name, learning_rate, schedule="constant", total_steps=1):
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


def atomic_save_model(model, path):
    temporary = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(temporary)
    os.replace(temporary, path)


def data_metrics(model, images, labels, batch_size):
    """Accuracy and mean cross-entropy of the data term alone (no penalties), in inference mode."""
    logits = model.predict(images, batch_size=max(batch_size, 512), verbose=0)
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return {
        "accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels)),
        "loss": float(np.mean(keras.ops.convert_to_numpy(loss))),
    }


def jacobian_statistics(model, images):
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


def train(output_dir=None):
    """Runs the training described by the flags; returns the metrics dict (also written to metrics.json)."""
    output_dir = output_dir or FLAGS.output_dir
    os.makedirs(output_dir, exist_ok=True)
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    penalties = parse_penalties(FLAGS.penalties)
    if FLAGS.deterministic and FLAGS.jit_compile:
        logging.info("--deterministic with --jit_compile: XLA on CPU is deterministic; on GPU it may not be.")

    train_images, train_labels = kw.data.load_arrays(FLAGS.dataset, "train", data_dir=FLAGS.data_dir)
    test_images, test_labels = kw.data.load_arrays(FLAGS.dataset, "test", data_dir=FLAGS.data_dir)
    if FLAGS.train_examples:
        train_images, train_labels = train_images[: FLAGS.train_examples], train_labels[: FLAGS.train_examples]
    if FLAGS.test_examples:
        test_images, test_labels = test_images[: FLAGS.test_examples], test_labels[: FLAGS.test_examples]
    # The order of epoch e depends on (seed, e) only, so a resumed run sees the same batches as an
    # uninterrupted one.
    train_pipeline = kw.data.EpochShuffledPipeline(train_images, train_labels, FLAGS.batch_size, seed=FLAGS.seed)
    test_data = kw.data.make_pipeline(test_images, test_labels, FLAGS.batch_size)

    kwargs = {"hidden_units": tuple(int(v) for v in FLAGS.hidden_units)} if FLAGS.model == "mlp" else {}
    model = kw.architectures.build(FLAGS.model, input_shape=train_images.shape[1:], num_classes=10, **kwargs)
    model.compile(
        optimizer=make_optimizer(
            FLAGS.optimizer,
            FLAGS.learning_rate,
            FLAGS.lr_schedule,
            total_steps=FLAGS.epochs * -(-len(train_images) // FLAGS.batch_size),
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        regularizers=penalties,
        jit_compile=FLAGS.jit_compile,
    )
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    callbacks = [
        # First, so that a non-finite batch stops the run before any epoch-end callback saves its weights.
        kw.callbacks.TerminateOnNonFinite(),
        kw.callbacks.SetPipelineEpoch(train_pipeline),
        kw.callbacks.AtomicBackupAndRestore(os.path.join(output_dir, "backup")),
        kw.callbacks.AtomicWeightsCheckpoint(os.path.join(checkpoint_dir, "epoch{epoch:03d}.weights.h5")),
        keras.callbacks.TensorBoard(os.path.join(output_dir, "logs"), histogram_freq=0),
    ]
    start = time.time()
    history = model.fit(
        train_pipeline.dataset, validation_data=test_data, epochs=FLAGS.epochs, callbacks=callbacks, verbose=FLAGS.verbose,
        shuffle=False,  # The pipeline shuffles every epoch itself.
    )
    seconds = time.time() - start

    train_metrics = data_metrics(model, train_images, train_labels, FLAGS.batch_size)
    test_metrics = data_metrics(model, test_images, test_labels, FLAGS.batch_size)
    metrics = {
        "dataset": FLAGS.dataset,
        "model": FLAGS.model,
        "penalties": [kw.penalties.serialize(p)["config"] | {"class_name": type(p).__name__} for p in penalties],
        "epochs": FLAGS.epochs,
        "seed": FLAGS.seed,
        "train_seconds": seconds,
        "train_accuracy": train_metrics["accuracy"],
        "train_loss": train_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "generalization_gap_accuracy": train_metrics["accuracy"] - test_metrics["accuracy"],
        "generalization_gap_loss": test_metrics["loss"] - train_metrics["loss"],
        "penalty_values": {p.name: float(history.history[p.name][-1]) for p in penalties if p.name in history.history},
    }
    metrics.update(jacobian_statistics(model, test_images[: FLAGS.jacobian_examples]))
    atomic_save_model(model, os.path.join(output_dir, "model.keras"))
    atomic_write_json(os.path.join(output_dir, "metrics.json"), metrics)
    logging.info("Wrote %s: test accuracy %.4f", output_dir, metrics["test_accuracy"])
    return metrics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metrics = train()
    print(json.dumps({k: v for k, v in metrics.items() if k != "penalties"}, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
