r"""Cost of `keras_wssi.callbacks.TerminateOnNonFinite` per training step (checking every variable after each batch).

    python benchmarks/nonfinite_guard_overhead.py [--hidden_units=1024,1024] [--repeats=5]

Trains the MLP of `examples/train.py` (784-1024-1024-10, Adam, XLA, `weissi:1e-2`) on random data, one epoch at a
time, alternating an epoch without the guard and one with it, and prints the median time per step of each and
their ratio (one run; interleaved so that machine load hits both alike).
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wssi as kw  # noqa: E402

flags.DEFINE_list("hidden_units", ["1024", "1024"], "MLP widths.")
flags.DEFINE_integer("steps", 40, "Steps per timed epoch.")
flags.DEFINE_integer("repeats", 5, "Timed epochs per setting.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    x = rng.random((FLAGS.steps * FLAGS.batch_size, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, len(x)).astype("int32")
    model = kw.architectures.mlp(input_shape=(28, 28, 1), hidden_units=tuple(int(u) for u in FLAGS.hidden_units))
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        regularizers=["weissi:1e-2"], jit_compile=True,
    )
    guard = kw.callbacks.TerminateOnNonFinite()
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, callbacks=[guard])  # Compile both paths.
    times = {"without": [], "with": []}
    for _ in range(FLAGS.repeats):
        for name, callbacks in (("without", []), ("with", [guard])):
            start = time.perf_counter()
            model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, callbacks=callbacks)
            times[name].append((time.perf_counter() - start) / FLAGS.steps * 1e3)
    without, with_guard = np.median(times["without"]), np.median(times["with"])
    print(f"step without guard {without:.2f} ms, with guard {with_guard:.2f} ms, ratio {with_guard / without:.3f}x")


if __name__ == "__main__":
    app.run(main)
