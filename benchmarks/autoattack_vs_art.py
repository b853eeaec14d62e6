r"""keras_wssi's compiled APGD against ART's `AutoProjectedGradientDescent`, then the whole ensemble's runtime.

Both sides attack the same TF model on the same MNIST test images with the same settings: L∞ (or L2) ball of
radius `--eps`, box [0, 1], `--nb_iter` iterations, initial step `2ε` (ART's `eps_step`), one random start,
cross-entropy loss (and, with `--dlr`, the untargeted DLR loss). ART runs its NumPy loop around the model's
gradients (`TensorFlowV2Classifier`); keras_wssi runs `AttackRunner` with the compiled kernel (tracing included
in its time). Each side runs once; the script prints both robust accuracies, both times and the ratio. Then it
times `keras_wssi.evaluation.autoattack` (the worst case over APGD-CE, APGD-T, FAB-T and Square) on the same
images with the chosen version and budget.

    python benchmarks/autoattack_vs_art.py --data_dir=../shared/data                      # MLP 784-1024-1024-10
    python benchmarks/autoattack_vs_art.py --data_dir=../shared/data --architecture=cnn
    python benchmarks/autoattack_vs_art.py --model=runs/default/model.keras --square_queries=5000
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

import keras_wssi as kw  # noqa: E402
from benchmark_data import model_to_attack  # noqa: E402
from benchmark_data import resolve_data_dir  # noqa: E402
from keras_wssi import evaluation  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or ../shared/data.")
flags.DEFINE_string("model", "", "A .keras classifier (logits); default: train --architecture briefly.")
flags.DEFINE_enum("architecture", "mlp", list(kw.architectures.ARCHITECTURES), "Architecture when --model is unset.")
flags.DEFINE_list("hidden_units", ["1024", "1024"], "MLP widths when --model is unset (train.py's default).")
flags.DEFINE_integer("examples", 1000, "MNIST test examples attacked.")
flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model.")
flags.DEFINE_float("eps", 0.1, "Radius of the ball.")
flags.DEFINE_integer("nb_iter", 100, "APGD iterations (AutoAttack: 100).")
flags.DEFINE_integer("batch_size", 500, "Batch size of both sides.")
flags.DEFINE_boolean("dlr", False, "Also compare the untargeted DLR loss.")
flags.DEFINE_enum("version", "standard", list(evaluation.AUTOATTACK_VERSIONS), "Ensemble version to time.")
flags.DEFINE_integer("square_queries", 5000, "Square queries in the ensemble (standard: 5000).")
flags.DEFINE_integer("n_targets", 9, "Target classes of APGD-T and FAB-T in the ensemble (standard: 9).")
flags.DEFINE_boolean("ensemble", True, "Time the whole ensemble after the APGD comparison.")
flags.DEFINE_boolean("jit_compile", False, "XLA for keras_wssi's kernels.")
flags.DEFINE_integer("seed", 0, "Seed of both sides' random starts.")


def _model(data_dir):
    return model_to_attack(FLAGS.model, FLAGS.architecture, FLAGS.hidden_units, data_dir)


def _art_apgd(model, x, y, loss_type):
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=lambda z, training=False: model(z, training=False), nb_classes=10, input_shape=x.shape[1:],
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True), clip_values=(0.0, 1.0),
    )
    attack = AutoProjectedGradientDescent(
        classifier, norm=np.inf if FLAGS.norm == "linf" else 2, eps=FLAGS.eps, eps_step=2 * FLAGS.eps,
        max_iter=FLAGS.nb_iter, nb_random_init=1, batch_size=FLAGS.batch_size, loss_type=loss_type, verbose=False,
    )
    np.random.seed(FLAGS.seed)
    started = time.perf_counter()
    x_adv = attack.generate(x=x, y=y)
    seconds = time.perf_counter() - started
    predictions = np.argmax(model.predict(x_adv, batch_size=FLAGS.batch_size, verbose=0), axis=1)
    return float(np.mean(predictions == y)), seconds


def _ours(model, x, y, name):
    suffix = "" if FLAGS.norm == "linf" else "_l2"
    runner = evaluation.AttackRunner(model, evaluation.get_attack(name + suffix, nb_iter=FLAGS.nb_iter),
                                     batch_size=FLAGS.batch_size, seed=FLAGS.seed, jit_compile=FLAGS.jit_compile,
                                     progress=False)
    started = time.perf_counter()
    accuracy = runner.robust_accuracy(x, y, [FLAGS.eps])["accuracy"][0]
    return accuracy, time.perf_counter() - started


def main(argv):
    del argv
    data_dir = resolve_data_dir(FLAGS.data_dir)
    model, description = _model(data_dir)
    x_test, y_test = kw.data.load_arrays("mnist", "test", data_dir)
    x, y = np.array(x_test[: FLAGS.examples]), np.array(y_test[: FLAGS.examples]).astype(np.int32)
    clean = evaluation.clean_metrics(model, x, y)["accuracy"]
    print(f"model: {description}; {len(x)} MNIST test images; clean accuracy {clean:.4f}")
    print(f"threat model {FLAGS.norm} eps={FLAGS.eps}; APGD {FLAGS.nb_iter} iterations, 1 random start, initial "
          f"step 2*eps, batch {FLAGS.batch_size}; TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"CPU threads: {os.cpu_count()}")
    losses = [("apgd_ce", "cross_entropy", "CE")] + ([("apgd_dlr", "difference_logits_ratio", "DLR")]
                                                     if FLAGS.dlr else [])
    for ours_name, art_loss, label in losses:
        ours_accuracy, ours_seconds = _ours(model, x, y, ours_name)
        art_accuracy, art_seconds = _art_apgd(model, x, y, art_loss)
        print(f"APGD-{label}: keras_wssi robust accuracy {ours_accuracy:.4f} in {ours_seconds:.1f} s | ART "
              f"AutoProjectedGradientDescent {art_accuracy:.4f} in {art_seconds:.1f} s | difference "
              f"{ours_accuracy - art_accuracy:+.4f}, speed-up {art_seconds / ours_seconds:.2f}x")
    if not FLAGS.ensemble:
        return
    budget = {"square_compiled": {"nb_iter": FLAGS.square_queries}, "apgd_t": {"n_targets": FLAGS.n_targets},
              "fab_t": {"n_targets": FLAGS.n_targets}}
    if FLAGS.version == "fast":
        budget.pop("fab_t")
    result = evaluation.autoattack(model, x, y, FLAGS.eps, norm=FLAGS.norm, version=FLAGS.version, seed=FLAGS.seed,
                                   batch_size=FLAGS.batch_size, budget=budget, jit_compile=FLAGS.jit_compile,
                                   progress=True)
    print(f"ensemble ({FLAGS.version}, square queries {FLAGS.square_queries}, targets {FLAGS.n_targets}): clean "
          f"{result['clean_accuracy']:.4f}, robust {result['robust_accuracy']:.4f}, "
          f"{result['forward_passes']} forward passes, {result['seconds']:.1f} s")


if __name__ == "__main__":
    app.run(main)
