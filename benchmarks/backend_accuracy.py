"""MNIST accuracy on the TensorFlow and JAX backends with the main penalties: same script, same flags, same seeds.

Runs `examples/train.py` once per (backend, penalty, seed), each in its own process (Keras picks its backend at
import), and prints the test accuracy per backend (mean over seeds), the difference of the means, and the spread
between seeds on each backend — the noise the difference is to be judged against. Weight initialization and
shuffling draw from each backend's own generator, so the two backends train from different (equally distributed)
starting points; agreement is expected within the seed-to-seed spread, not bit for bit.

    python benchmarks/backend_accuracy.py --data_dir=../shared/data
    python benchmarks/backend_accuracy.py --penalties=none,weissi:1e-3 --seeds=0,1,2 --epochs=3
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_data import resolve_data_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or ../shared/data.")
flags.DEFINE_list("backends", ["tensorflow", "jax"], "Keras backends.")
flags.DEFINE_list(
    "penalties", ["none", "weissi:1e-3", "l2:1e-4", "input_gradient:0.1", "jacobian_spectral_norm:0.01"],
    "Penalty settings (train.py --penalties values; 'none' for no penalty).",
)
flags.DEFINE_list("seeds", ["0", "1"], "Seeds.")
flags.DEFINE_integer("epochs", 2, "Epochs per run.")
flags.DEFINE_string("hidden_units", "256,256", "MLP hidden widths.")
flags.DEFINE_integer("train_examples", 20000, "Training examples (0: all 60,000).")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def _run(backend, penalty, seed, folder, data_dir):
    output = os.path.join(folder, f"{backend}_{penalty.replace(':', '_')}_{seed}")
    command = [
        sys.executable, os.path.join(REPO, "examples", "train.py"), f"--data_dir={data_dir}", f"--output_dir={output}",
        f"--penalties={'' if penalty == 'none' else penalty}", f"--seed={seed}", f"--epochs={FLAGS.epochs}",
        f"--hidden_units={FLAGS.hidden_units}", f"--train_examples={FLAGS.train_examples}", "--jacobian_examples=100",
        "--progress=none", "--fresh",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed on {backend} with {penalty}, seed {seed}:\n{done.stderr[-3000:]}")
    with open(os.path.join(output, "metrics.json")) as handle:
        accuracy = json.load(handle)["test_accuracy"]
    return accuracy, time.perf_counter() - start


def main(argv):
    del argv
    data_dir = resolve_data_dir(FLAGS.data_dir)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for penalty in FLAGS.penalties:
            for seed in FLAGS.seeds:
                for backend in FLAGS.backends:  # Interleaved, so that load hits both backends alike.
                    accuracy, seconds = _run(backend, penalty, seed, folder, data_dir)
                    results.setdefault(penalty, {}).setdefault(backend, []).append(accuracy)
                    print(f"{penalty:28s} seed {seed} {backend:10s} test accuracy {accuracy:.4f} ({seconds:.0f} s)", flush=True)
    print(f"\nMLP {FLAGS.hidden_units}, {FLAGS.epochs} epochs on {FLAGS.train_examples or 60000} MNIST images, "
          f"seeds {','.join(FLAGS.seeds)}; test accuracy mean per backend, and the seed-to-seed range on each:")
    for penalty, by_backend in results.items():
        cells = "  ".join(
            f"{b} {sum(v) / len(v):.4f} (range {max(v) - min(v):.4f})" for b, v in by_backend.items()
        )
        means = [sum(v) / len(v) for v in by_backend.values()]
        print(f"{penalty:28s} {cells}  |difference of means| {max(means) - min(means):.4f}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    app.run(main)
