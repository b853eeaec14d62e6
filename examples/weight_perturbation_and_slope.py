"""Experiments of issue #5: robustness to weight perturbations, and the slope of ReLU MLPs.

Parts (select with --parts):
  a  Accuracy under random and adversarial weight perturbations vs ε on MNIST and Fashion-MNIST for MLPs
     trained with no penalty, weight decay, WEISSI, the theory-driven weight-perturbation loss and SAM
     (plus certified accuracy at small ε).
  b  Slope distributions (750 fixed training points, at the lowest-test-loss epoch) of 1–3 hidden-layer
     ReLU MLPs of several widths: is the distribution width-independent (Johansson et al. 2021)?
  c  Slope after upsampling the inputs by k (nearest neighbour): does it scale like 1/k?
  d  Data-set complexity: MNIST vs Fashion-MNIST by the slope of a reference network.

    python examples/weight_perturbation_and_slope.py --data_dir=../shared/data
    python examples/weight_perturbation_and_slope.py --parts=b,c --slope_epochs=3

Every flag has a default; results go to --output_dir (JSON) and plots to --plot_dir.
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
from keras_wssi.evaluation.weight_perturbation import evaluate_weight_perturbations  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or ../shared/data.")
flags.DEFINE_string("output_dir", "runs/weight_perturbation_and_slope", "Folder for the JSON results.")
flags.DEFINE_string("plot_dir", "docs", "Folder for the PNG plots.")
flags.DEFINE_list("parts", ["a", "b", "c", "d"], "Parts to run: a, b, c, d (see the module docstring).")
flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Data sets.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("num_train", 60000, "Training images used (first N).")
flags.DEFINE_integer("num_test", 2000, "Test images used for the perturbation curves and the test loss.")
# Part a.
flags.DEFINE_list("methods", ["none", "weight_decay", "weissi", "weight_perturbation", "sam"], "Part a: training methods.")
flags.DEFINE_list("hidden_units", ["256", "256"], "Part a: hidden widths of the MLP.")
flags.DEFINE_integer("epochs", 5, "Part a: training epochs.")
flags.DEFINE_list("epsilons", ["0", "0.01", "0.02", "0.05", "0.1", "0.2", "0.3"], "Part a: relative radii ε (ε·||W_l||).")
flags.DEFINE_string("norm", "inf", "Part a: operator norm of the perturbation ball (inf, 1, 2).")
flags.DEFINE_integer("num_draws", 3, "Part a: random draws per ε.")
flags.DEFINE_integer("attack_steps", 10, "Part a: projected-ascent steps of the adversarial weight perturbation.")
flags.DEFINE_integer("attack_batch_size", 500, "Part a: examples per adversarial weight perturbation.")
flags.DEFINE_float("weight_decay", 1e-4, "Part a: strength of L2 weight decay.")
flags.DEFINE_float("weissi", 1e-3, "Part a: strength of WEISSI (log-product).")
flags.DEFINE_float("wp_epsilon", 1e-3, "Part a: absolute ε of the theory-driven loss.")
flags.DEFINE_float("wp_margin_weight", 0.1, "Part a: margin-hinge weight λ1 of the theory-driven loss.")
flags.DEFINE_float("wp_complexity_weight", 1e-5, "Part a: complexity weight λ2 of the theory-driven loss.")
flags.DEFINE_float("sam_rho", 0.05, "Part a: SAM radius ρ.")
# Parts b, c, d.
flags.DEFINE_list("slope_widths", ["25", "50", "100", "200"], "Part b: hidden widths.")
flags.DEFINE_list("slope_depths", ["1", "2", "3"], "Part b: numbers of hidden layers.")
flags.DEFINE_integer("slope_epochs", 5, "Parts b–d: epochs (the slope is taken at the lowest-test-loss epoch).")
flags.DEFINE_integer("num_slope_points", 750, "Parts b–d: fixed training points for the slope.")
flags.DEFINE_integer("upsample_factor", 2, "Part c: upsampling factor k.")
flags.DEFINE_integer("upsample_width", 100, "Part c: hidden width of the MLPs compared.")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(name):
    data_dir = FLAGS.data_dir or kw.data.default_data_dir()
    if data_dir is None:
        candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
        data_dir = candidate if os.path.isdir(candidate) else None
    x_train, y_train = kw.data.load_arrays(name, "train", data_dir=data_dir)
    x_test, y_test = kw.data.load_arrays(name, "test", data_dir=data_dir)
    return (np.asarray(x_train[: FLAGS.num_train]), np.asarray(y_train[: FLAGS.num_train]),
            np.asarray(x_test[: FLAGS.num_test]), np.asarray(y_test[: FLAGS.num_test]))


def _penalties(method):
    if method == "none":
        return []
    if method == "weight_decay":
        return [P.WeightDecay(FLAGS.weight_decay, p=2)]
    if method == "weissi":
        return [P.WEISSI(FLAGS.weissi)]
    if method == "weight_perturbation":
        return [P.WeightPerturbationLoss(1.0, epsilon=FLAGS.wp_epsilon, margin_weight=FLAGS.wp_margin_weight,
                                         complexity_weight=FLAGS.wp_complexity_weight)]
    if method == "sam":
        return [P.SharpnessAwareMinimization(1.0, rho=FLAGS.sam_rho)]
    raise app.UsageError(f"--methods: unknown {method!r}.")


def part_a(results):
    epsilons = [float(e) for e in FLAGS.epsilons]
    hidden = tuple(int(h) for h in FLAGS.hidden_units)
    out = results.setdefault("a", {})
    for dataset in FLAGS.datasets:
        x_train, y_train, x_test, y_test = _data(dataset)
        for method in FLAGS.methods:
            keras.utils.set_random_seed(FLAGS.seed)
            model = kw.architectures.mlp(hidden_units=hidden)
            model.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"], regularizers=_penalties(method),
                          jit_compile=True)
            start = time.time()
            model.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, verbose=0)
            train_seconds = time.time() - start
            clean = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
            common = dict(norm=FLAGS.norm, relative=True, seed=FLAGS.seed)
            random = evaluate_weight_perturbations(model, x_test, y_test, epsilons, kind="random",
                                                   num_draws=FLAGS.num_draws, batch_size=1000, **common)
            adversarial = evaluate_weight_perturbations(model, x_test, y_test, epsilons, kind="adversarial",
                                                        steps=FLAGS.attack_steps, batch_size=FLAGS.attack_batch_size,
                                                        jit_compile=True, **common)
            certified = {e: kw.analysis.certified_accuracy(model, x_test, y_test, e, norm=FLAGS.norm, relative=True,
                                                           mode="activation")
                         for e in (1e-4, 1e-3, 1e-2)}
            norms = random["settings"]["layer_norms"]
            out.setdefault(dataset, {})[method] = {
                "clean_accuracy": clean,
                "random": random["accuracy"],
                "random_std": random["accuracy_std"],
                "adversarial": adversarial["accuracy"],
                "certified_relative": certified,
                "layer_norms": norms,
                "train_seconds": train_seconds,
            }
            print(f"[a] {dataset:13s} {method:20s} clean {clean:.4f} random {np.round(random['accuracy'], 3)} "
                  f"adversarial {np.round(adversarial['accuracy'], 3)} certified {certified}", flush=True)
    out["epsilons"] = epsilons


class _BestEpochSlope(keras.callbacks.Callback):
    """Measures the slope on fixed points every epoch and keeps the one at the lowest test loss (their protocol)."""

    def __init__(self, points, x_test, y_test):
        super().__init__()
        self.points, self.x_test, self.y_test = points, x_test, y_test
        self.best_loss, self.best_values, self.best_epoch = np.inf, None, None

    def on_epoch_end(self, epoch, logs=None):
        loss = float(LOSS(self.y_test, self.model.predict(self.x_test, verbose=0, batch_size=1000)))
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self.best_values = kw.analysis.slope(self.model, self.points)


def _train_for_slope(x_train, y_train, x_test, y_test, hidden, seed):
    keras.utils.set_random_seed(seed)
    model = kw.architectures.mlp(input_shape=x_train.shape[1:], hidden_units=hidden)
    model.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"], jit_compile=True)
    tracker = _BestEpochSlope(x_train[: FLAGS.num_slope_points], x_test, y_test)
    model.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.slope_epochs, verbose=0, callbacks=[tracker])
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    values = tracker.best_values
    return {
        "median": float(np.median(values)), "mean": float(values.mean()),
        "q10": float(np.quantile(values, 0.1)), "q90": float(np.quantile(values, 0.9)),
        "best_epoch": tracker.best_epoch, "test_loss": tracker.best_loss, "test_accuracy": accuracy,
        "values": values.tolist(),
    }


def part_b(results):
    out = results.setdefault("b", {})
    for dataset in FLAGS.datasets:
        x_train, y_train, x_test, y_test = _data(dataset)
        for depth in (int(d) for d in FLAGS.slope_depths):
            for width in (int(w) for w in FLAGS.slope_widths):
                summary = _train_for_slope(x_train, y_train, x_test, y_test, (width,) * depth, FLAGS.seed)
                out.setdefault(dataset, {})[f"{depth}x{width}"] = summary
                print(f"[b] {dataset:13s} depth {depth} width {width:4d} slope median {summary['median']:.3f} "
                      f"q10 {summary['q10']:.3f} q90 {summary['q90']:.3f} (epoch {summary['best_epoch']}, "
                      f"acc {summary['test_accuracy']:.4f})", flush=True)


def part_c(results):
    out = results.setdefault("c", {})
    k = FLAGS.upsample_factor
    for dataset in FLAGS.datasets:
        x_train, y_train, x_test, y_test = _data(dataset)
        up = lambda images: np.repeat(np.repeat(images, k, axis=1), k, axis=2)  # noqa: E731
        for depth in (1, 2):
            hidden = (FLAGS.upsample_width,) * depth
            original = _train_for_slope(x_train, y_train, x_test, y_test, hidden, FLAGS.seed)
            upsampled = _train_for_slope(up(x_train), y_train, up(x_test), y_test, hidden, FLAGS.seed)
            ratio = upsampled["median"] / original["median"]
            out.setdefault(dataset, {})[f"depth{depth}"] = {"original": original, "upsampled": upsampled, "ratio": ratio}
            print(f"[c] {dataset:13s} depth {depth}: slope median {original['median']:.3f} → {upsampled['median']:.3f} "
                  f"after ×{k} upsampling (ratio {ratio:.3f}, 1/k = {1 / k:.3f})", flush=True)


def part_d(results):
    data_dir = FLAGS.data_dir or kw.data.default_data_dir()
    ranking = kw.experiments.dataset_complexity(FLAGS.datasets, data_dir=data_dir, hidden_units=(100,),
                                             epochs=FLAGS.slope_epochs, num_train=FLAGS.num_train,
                                             num_points=FLAGS.num_slope_points, seed=FLAGS.seed)
    results["d"] = ranking
    for entry in ranking:
        print(f"[d] {entry['dataset']:13s} median slope {entry['median']:.3f} (test accuracy {entry['test_accuracy']:.4f})")


def _plots(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(FLAGS.plot_dir, exist_ok=True)
    if "a" in results:
        epsilons = results["a"]["epsilons"]
        datasets = [d for d in FLAGS.datasets if d in results["a"]]
        figure, axes = plt.subplots(2, len(datasets), figsize=(4.2 * len(datasets), 6.4), squeeze=False)
        for column, dataset in enumerate(datasets):
            for row, kind in enumerate(("random", "adversarial")):
                axis = axes[row, column]
                for method, entry in results["a"][dataset].items():
                    axis.plot(epsilons, entry[kind], marker="o", markersize=3, label=method)
                axis.set_xscale("symlog", linthresh=min([e for e in epsilons if e > 0], default=1e-3))
                axis.set_title(f"{dataset}: {kind} weight perturbation", fontsize=9)
                axis.set_xlabel("relative ε (||Δ_l||∞ ≤ ε ||W_l||∞, all layers)", fontsize=8)
                axis.set_ylabel("test accuracy", fontsize=8)
                axis.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(os.path.join(FLAGS.plot_dir, "weight_perturbation_accuracy.png"), dpi=70)
        plt.close(figure)
    if "b" in results:
        datasets = [d for d in FLAGS.datasets if d in results["b"]]
        figure, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 3.4), squeeze=False)
        for column, dataset in enumerate(datasets):
            axis = axes[0, column]
            labels = list(results["b"][dataset])
            axis.boxplot([results["b"][dataset][l]["values"] for l in labels], showfliers=False)
            axis.set_xticks(range(1, len(labels) + 1), labels, rotation=60, fontsize=7)
            axis.set_title(f"{dataset}: slope at best epoch (depth×width)", fontsize=9)
            axis.set_ylabel("slope σ_max(J)", fontsize=8)
            axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(os.path.join(FLAGS.plot_dir, "slope_vs_width.png"), dpi=70)
        plt.close(figure)
    if "c" in results:
        datasets = [d for d in FLAGS.datasets if d in results["c"]]
        figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.0), squeeze=False)
        for column, dataset in enumerate(datasets):
            axis = axes[0, column]
            entry = results["c"][dataset]["depth1"]
            bins = np.linspace(0, max(max(entry["original"]["values"]), max(entry["upsampled"]["values"])), 40)
            axis.hist(entry["original"]["values"], bins=bins, alpha=0.6, label="28×28")
            axis.hist(entry["upsampled"]["values"], bins=bins, alpha=0.6, label=f"×{FLAGS.upsample_factor} upsampled")
            axis.set_title(f"{dataset}: slope, 1 hidden layer", fontsize=9)
            axis.set_xlabel("slope", fontsize=8)
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(os.path.join(FLAGS.plot_dir, "slope_upsampling.png"), dpi=70)
        plt.close(figure)


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.parts) - {"a", "b", "c", "d"})
    if unknown:
        raise app.UsageError(f"--parts: unknown {unknown}; expected a subset of a,b,c,d.")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    path = os.path.join(FLAGS.output_dir, "results.json")
    results = {}
    if os.path.exists(path):
        with open(path) as handle:
            results = json.load(handle)
    for part, function in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
        if part in FLAGS.parts:
            function(results)
            with open(path, "w") as handle:
                json.dump(results, handle, indent=1, default=float)
    _plots(results)


if __name__ == "__main__":
    app.run(main)
