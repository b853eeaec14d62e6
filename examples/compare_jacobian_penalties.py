"""Trains one classifier per regularizer and compares accuracy, generalization gap, Jacobian norms and FGSM accuracy.

Regularizers: none, weight decay, WEISSI, input gradient, Jacobian Frobenius, exact Jacobian spectral norm, layer-wise
spectral upper bound, CURE and cross-Lipschitz (DESIGN.md §1.1–1.3). For each data set and regularizer it reports test
accuracy, the generalization gap (train − test accuracy, train accuracy measured on the training examples used), the
mean σ_max(J) and ||J||_F of the logit Jacobian on test data (exact, from the full per-example Jacobian), and FGSM
accuracy at each ε (one signed input-gradient step, L∞, inputs clipped to [0, 1]; any Keras backend).

    python examples/compare_jacobian_penalties.py --data_dir=../shared/data
    python examples/compare_jacobian_penalties.py --datasets=mnist --configs=none,cure --epochs=1
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wssi as kw  # noqa: E402
from keras_wssi import penalties as P  # noqa: E402

# Config name → zero-argument factory of the penalties (strengths chosen once, not tuned per data set).
CONFIGS = {
    "none": lambda: [],
    "weight_decay": lambda: [P.WeightDecay(1e-4, p=2)],
    "weissi": lambda: [P.WEISSI(1e-2)],
    "input_gradient": lambda: [P.InputGradient(0.5)],
    "jacobian_frobenius": lambda: [P.JacobianFrobenius(0.05, num_projections=1)],
    "jacobian_spectral_norm": lambda: [P.JacobianSpectralNorm(0.01)],
    "jacobian_spectral_norm_exact": lambda: [P.JacobianSpectralNorm(0.01, method="exact")],
    "layerwise_spectral_norm": lambda: [P.LayerwiseSpectralNorm(0.01)],
    "cure": lambda: [P.CURE(1.0, h=0.5)],
    "cross_lipschitz": lambda: [P.CrossLipschitz(0.05)],
}

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or tensorflow-datasets.")
flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Data sets.")
flags.DEFINE_list("configs", list(CONFIGS), "Regularizers to compare. Known: " + ", ".join(CONFIGS))
flags.DEFINE_list("hidden_units", ["256", "256"], "Hidden layer widths of the ReLU MLP.")
flags.DEFINE_integer("epochs", 3, "Training epochs.")
flags.DEFINE_integer("train_examples", 60000, "Training examples used (the first N).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("jacobian_examples", 1000, "Test examples for the Jacobian norms.")
flags.DEFINE_integer("attack_examples", 10000, "Test examples for FGSM accuracy.")
flags.DEFINE_list("epsilons", ["0.1", "0.2"], "FGSM L∞ budgets (inputs in [0, 1]).")
flags.DEFINE_boolean("jit_compile", True, "Train with XLA.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def fgsm_accuracy(model, x, y, epsilon, batch_size=1000):
    """Accuracy under FGSM (L∞, clipped to [0, 1]): one signed input-gradient step of the cross-entropy, written
    once in keras.ops (the input gradient through `keras_wssi.backend.grad`), so it runs on every backend."""
    from keras import ops

    def loss_of(labels):
        def loss(batch):
            logits = model(batch, training=False)
            return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

        return loss

    correct = 0
    for start in range(0, len(x), batch_size):
        batch = ops.convert_to_tensor(x[start : start + batch_size])
        labels = ops.convert_to_tensor(y[start : start + batch_size])
        (gradient,) = kw.backend.grad(loss_of(labels), batch)
        adversarial = ops.clip(batch + epsilon * ops.sign(gradient), 0.0, 1.0)
        predictions = np.argmax(keras.ops.convert_to_numpy(model.predict_on_batch(adversarial)), axis=-1)
        correct += int(np.sum(predictions == y[start : start + batch_size]))
    return correct / len(x)


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=1000, verbose=0), axis=-1) == y))


def run_one(dataset, config, arrays):
    x_train, y_train, x_test, y_test = arrays
    keras.utils.set_random_seed(FLAGS.seed)
    model = kw.architectures.mlp(hidden_units=tuple(int(u) for u in FLAGS.hidden_units))
    model.compile(
        keras.optimizers.Adam(FLAGS.learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        regularizers=CONFIGS[config](),
        jit_compile=FLAGS.jit_compile,
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=0, shuffle=True)
    seconds = time.perf_counter() - start
    jacobian = kw.analysis.input_jacobian(model, x_test[: FLAGS.jacobian_examples], batch_size=250)
    flat = jacobian.reshape(len(jacobian), jacobian.shape[1], -1)
    sigma = np.linalg.svd(flat, compute_uv=False)[:, 0]
    frobenius = np.sqrt(np.sum(flat**2, axis=(1, 2)))
    train_accuracy = accuracy(model, x_train, y_train)
    test_accuracy = accuracy(model, x_test, y_test)
    result = {
        "dataset": dataset,
        "config": config,
        "test_accuracy": test_accuracy,
        "train_accuracy": train_accuracy,
        "generalization_gap": train_accuracy - test_accuracy,
        "sigma_max_mean": float(sigma.mean()),
        "frobenius_mean": float(frobenius.mean()),
        "train_seconds": seconds,
    }
    attack_x, attack_y = x_test[: FLAGS.attack_examples], y_test[: FLAGS.attack_examples]
    for epsilon in FLAGS.epsilons:
        result[f"fgsm_{epsilon}"] = fgsm_accuracy(model, attack_x, attack_y, float(epsilon))
    return result


def markdown_table(results):
    epsilons = list(FLAGS.epsilons)
    header = ["data set", "regularizer", "test acc", "gap", "mean σ_max(J)", "mean ‖J‖_F"]
    header += [f"FGSM ε={e}" for e in epsilons] + ["train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["dataset"], r["config"], f"{r['test_accuracy']:.4f}", f"{r['generalization_gap']:+.4f}",
                 f"{r['sigma_max_mean']:.3f}", f"{r['frobenius_mean']:.3f}"]
        cells += [f"{r[f'fgsm_{e}']:.4f}" for e in epsilons] + [f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = [c for c in FLAGS.configs if c not in CONFIGS]
    if unknown:
        raise app.UsageError(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    results = []
    for dataset in FLAGS.datasets:
        x_train, y_train = kw.data.load_arrays(dataset, "train", data_dir=FLAGS.data_dir)
        x_test, y_test = kw.data.load_arrays(dataset, "test", data_dir=FLAGS.data_dir)
        arrays = (np.asarray(x_train[: FLAGS.train_examples]), np.asarray(y_train[: FLAGS.train_examples]),
                  np.asarray(x_test), np.asarray(y_test))
        for config in FLAGS.configs:
            result = run_one(dataset, config, arrays)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(markdown_table(results))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    app.run(main)
