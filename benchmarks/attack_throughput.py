r"""PGD-40 (L∞) over the MNIST test set: keras_wssi's compiled runner against cleverhans called batch by batch.

The reference is cleverhans's own usage (its `tutorials/tf2/mnist_tutorial.py`): a Python loop over
batches of 128 calling `projected_gradient_descent(model, x, eps=0.3, eps_iter=0.01, nb_iter=40,
norm=np.inf)` eagerly, here with the true labels and the [0, 1] clip range passed so that both sides solve
the same problem. Ours is `AttackRunner`: the same cleverhans function traced once into a `tf.function`
and called on batches of `--batch_size`. Each side runs once (ours including its tracing time); the script
checks that both produce the same adversarial examples and prints the ratio.

    python benchmarks/attack_throughput.py --data_dir=../shared/data                      # default MLP
    python benchmarks/attack_throughput.py --data_dir=../shared/data --architecture=cnn
    python benchmarks/attack_throughput.py --model=runs/default/model.keras
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent  # noqa: E402

import keras_wssi as kw  # noqa: E402
from benchmark_data import model_to_attack  # noqa: E402
from benchmark_data import resolve_data_dir  # noqa: E402
from keras_wssi import evaluation  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or ../shared/data.")
flags.DEFINE_string("model", "", "A .keras classifier (logits); default: train --architecture briefly.")
flags.DEFINE_enum("architecture", "mlp", list(kw.architectures.ARCHITECTURES), "Architecture when --model is unset.")
flags.DEFINE_list("hidden_units", ["1024", "1024"], "MLP widths when --model is unset (train.py's default).")
flags.DEFINE_integer("examples", 10000, "Test examples attacked (10000: the whole MNIST test set).")
flags.DEFINE_float("eps", 0.3, "L∞ radius (cleverhans tutorial: 0.3).")
flags.DEFINE_float("eps_iter", 0.01, "Step size (cleverhans tutorial: 0.01).")
flags.DEFINE_integer("nb_iter", 40, "PGD iterations.")
flags.DEFINE_integer("reference_batch_size", 128, "Batch size of the reference loop (cleverhans tutorial: 128).")
flags.DEFINE_integer("batch_size", 500, "Batch size of our runner.")
flags.DEFINE_boolean("jit_compile", False, "XLA for our runner.")


def _model(data_dir):
    return model_to_attack(FLAGS.model, FLAGS.architecture, FLAGS.hidden_units, data_dir)


def main(argv):
    del argv
    data_dir = resolve_data_dir(FLAGS.data_dir)
    model, description = _model(data_dir)
    x_test, y_test = kw.data.load_arrays("mnist", "test", data_dir)
    x_test, y_test = np.array(x_test[: FLAGS.examples]), np.array(y_test[: FLAGS.examples])
    n = len(x_test)
    print(f"model: {description}; {n} MNIST test images; PGD-{FLAGS.nb_iter} L∞ eps={FLAGS.eps} "
          f"eps_iter={FLAGS.eps_iter}, no random start, clip [0, 1], true labels")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, CPU threads: {os.cpu_count()}")

    # Reference: cleverhans's documented usage, one eager call per batch.
    started = time.perf_counter()
    reference = []
    for start in range(0, n, FLAGS.reference_batch_size):
        x = tf.constant(x_test[start : start + FLAGS.reference_batch_size])
        y = tf.constant(y_test[start : start + FLAGS.reference_batch_size])
        reference.append(
            projected_gradient_descent(model, x, FLAGS.eps, FLAGS.eps_iter, FLAGS.nb_iter, np.inf,
                                       clip_min=0.0, clip_max=1.0, y=y).numpy()
        )
    reference = np.concatenate(reference)
    reference_seconds = time.perf_counter() - started

    # Ours: the same cleverhans function, traced once and run batch by batch (tracing time included).
    attack = evaluation.get_attack("pgd", nb_iter=FLAGS.nb_iter, rand_init=False, step_size=FLAGS.eps_iter / FLAGS.eps)
    runner = evaluation.AttackRunner(model, attack, batch_size=FLAGS.batch_size, jit_compile=FLAGS.jit_compile,
                                     progress=False)
    started = time.perf_counter()
    ours = runner.generate(x_test, y_test, FLAGS.eps)
    ours_seconds = time.perf_counter() - started

    def robust_accuracy(x_adv):
        logits = model.predict(x_adv, batch_size=1000, verbose=0)
        return float(np.mean(np.argmax(logits, axis=1) == y_test))

    accuracy_reference, accuracy_ours = robust_accuracy(reference), robust_accuracy(ours)
    difference = np.abs(reference - ours)
    print(f"cleverhans eagerly, batch {FLAGS.reference_batch_size}: {reference_seconds:8.2f} s  "
          f"({n / reference_seconds:7.1f} examples/s)  robust accuracy {accuracy_reference:.4f}")
    print(f"keras_wssi AttackRunner, batch {FLAGS.batch_size}, jit_compile={FLAGS.jit_compile}: {ours_seconds:8.2f} s  "
          f"({n / ours_seconds:7.1f} examples/s)  robust accuracy {accuracy_ours:.4f}")
    print(f"same adversarial examples: max |difference| {difference.max():.3g}, "
          f"pixels differing by > 1e-6: {np.mean(difference > 1e-6):.2e}")
    print(f"speed-up (cleverhans time / ours): {reference_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    app.run(main)
