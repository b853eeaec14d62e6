"""Step-time overhead of each penalty: regularized train step / plain train step, measured in one run.

For each architecture (the 784-1024-1024-10 MLP and the small CNN, batch 128) and each XLA setting, the
plain step and every penalty's step are timed in interleaved rounds (plain, case, plain, case, …) so that
load from other processes hits both sides alike; the ratio of medians is printed.

    python benchmarks/step_overhead.py --data_dir=../shared/data
    python benchmarks/step_overhead.py --cases=weissi,l2 --architectures=mlp --jit=true
    python benchmarks/step_overhead.py --xla_ratio --cases=weissi,input_gradient   # XLA vs no XLA, same model
    python benchmarks/step_overhead.py --backend=jax,tensorflow --cases=weissi,input_gradient --jit=true

`--backend` runs each named Keras backend in its own process (Keras picks its backend at import) and prints their
ratios and plain-step milliseconds side by side. On JAX every step is XLA-compiled (`jit=true` only), the step is
Keras's own jitted `train_function(state, iterator)` over device-resident batches, and the hand-written and
XLA-ratio comparisons are TensorFlow-only.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_wssi as kw  # noqa: E402
from benchmark_data import resolve_data_dir  # noqa: E402
from keras_wssi import penalties as P  # noqa: E402

# Case name → zero-argument factory returning a penalty or a list of penalties. Spectral cases name their start
# vector: no suffix = "random", "_warm" = the per-class warm start, "_loss_gradient" = p − e_y;
# "jacobian_spectral_norm" is the penalty's default (Lanczos-3 from the warm start for 10 classes).
PENALTY_CASES = {
    "l2": lambda: P.WeightDecay(1e-4, p=2),
    "l1": lambda: P.WeightDecay(1e-5, p=1),
    "lp_p3": lambda: P.WeightDecay(1e-5, p=3),
    "weissi": lambda: P.WEISSI(1e-3),
    "weissi_product": lambda: P.WEISSI(1e-3, form="product"),
    "weissi_geometric_mean": lambda: P.WEISSI(1e-3, form="geometric_mean"),
    "weissi_spectral": lambda: P.WEISSI(1e-3, norm="spectral"),
    "weissi_p1": lambda: P.WEISSI(1e-3, norm=1.0),
    "weissi_direction": lambda: P.WEISSI(1e-3, direction_weight=1e-2),
    # Weight perturbation and slope (issue #5). "weight_perturbation" covers Dense networks only (its bound is
    # stated for feed-forward Dense chains): time it with --architectures=mlp.
    "weight_perturbation": lambda: P.WeightPerturbationLoss(1.0, epsilon=1e-3),
    "weight_perturbation_activation": lambda: P.WeightPerturbationLoss(1.0, epsilon=1e-3, mode="activation"),
    "sam": lambda: P.SharpnessAwareMinimization(rho=0.05),
    "slope": lambda: P.SlopePenalty(1e-3),
    "slope_power_iteration": lambda: P.SlopePenalty(1e-3, method="power_iteration", iterations=2),
    "input_gradient": lambda: P.InputGradient(0.1),
    "jacobian_frobenius": lambda: P.JacobianFrobenius(0.01, num_projections=1),
    "jacobian_frobenius_exact": lambda: P.JacobianFrobenius(0.01, num_projections=-1),
    "jacobian_spectral_norm": lambda: P.JacobianSpectralNorm(0.01),
    "jacobian_spectral_norm_lanczos1": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=1, start="random"),
    "jacobian_spectral_norm_lanczos2": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=2, start="random"),
    "jacobian_spectral_norm_lanczos3": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=3, start="random"),
    "jacobian_spectral_norm_lanczos4": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=4, start="random"),
    "jacobian_spectral_norm_lanczos6": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=6, start="random"),
    "jacobian_spectral_norm_power1": lambda: P.JacobianSpectralNorm(
        0.01, method="power_iteration", iterations=1, start="random"),
    "jacobian_spectral_norm_power2": lambda: P.JacobianSpectralNorm(
        0.01, method="power_iteration", iterations=2, start="random"),
    "jacobian_spectral_norm_power4": lambda: P.JacobianSpectralNorm(
        0.01, method="power_iteration", iterations=4, start="random"),
    "jacobian_spectral_norm_lanczos2_loss_gradient": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=2, start="loss_gradient"),
    "jacobian_spectral_norm_lanczos3_loss_gradient": lambda: P.JacobianSpectralNorm(
        0.01, method="lanczos", iterations=3, start="loss_gradient"),
    "jacobian_spectral_norm_lanczos1_warm": lambda: P.JacobianSpectralNorm(0.01, method="lanczos", iterations=1, start="warm"),
    "jacobian_spectral_norm_lanczos2_warm": lambda: P.JacobianSpectralNorm(0.01, method="lanczos", iterations=2, start="warm"),
    "jacobian_spectral_norm_lanczos3_warm": lambda: P.JacobianSpectralNorm(0.01, method="lanczos", iterations=3, start="warm"),
    "jacobian_spectral_norm_power2_warm": lambda: P.JacobianSpectralNorm(
        0.01, method="power_iteration", iterations=2, start="warm"),
    "jacobian_spectral_norm_exact": lambda: P.JacobianSpectralNorm(0.01, method="exact"),
    "layerwise_spectral_norm": lambda: P.LayerwiseSpectralNorm(0.01),
    "layerwise_spectral_norm_operator": lambda: P.LayerwiseSpectralNorm(0.01, conv_norm="operator"),
    "cure": lambda: P.CURE(4.0, h=0.5),
    "cross_lipschitz": lambda: P.CrossLipschitz(0.01),
    "cross_lipschitz_projection": lambda: P.CrossLipschitz(0.01, num_projections=1),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Raw IDX folder (offline); default: $KERAS_WSSI_DATA_DIR or ../shared/data.")
flags.DEFINE_list("cases", [], "Penalty cases to time (default: all). Known: " + ", ".join(PENALTY_CASES))
flags.DEFINE_list("architectures", ["mlp", "cnn"], "Architectures: mlp (784-1024-1024-10), cnn (small CNN).")
flags.DEFINE_list("jit", ["true", "false"], "XLA settings to time.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 20, "Steps per timed round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds (the median round is reported).")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")
flags.DEFINE_list(
    "backend", [], "Keras backends to time (tensorflow, jax), each in its own process, printed side by side; default: "
    "the current one ($KERAS_BACKEND).",
)
flags.DEFINE_list(
    "jax_jvp", [], "With --backend including jax: also time JAX with these Jacobian-vector-product modes (transpose: "
    "the transpose of the step's VJP, the default; forward: jax.jvp, true forward mode), each in its own process.",
)
BACKEND = keras.backend.backend()


def _images_and_labels(batch_size, steps):
    images, labels = kw.data.load_arrays("mnist", "train", data_dir=resolve_data_dir(FLAGS.data_dir))
    count = batch_size * steps
    return np.asarray(images[:count]), np.asarray(labels[:count])


def _build(architecture):
    if architecture == "mlp":
        return kw.architectures.mlp(hidden_units=(1024, 1024))
    if architecture == "cnn":
        return kw.architectures.small_cnn()
    raise ValueError(f"--architectures: unknown {architecture!r}; expected mlp or cnn.")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _compiled_model(architecture, penalties, jit_compile):
    keras.utils.set_random_seed(0)
    model = _build(architecture)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        regularizers=penalties,
        jit_compile=jit_compile,
    )
    return model


def _dataset(images, labels, batch_size):
    """The batches, repeated: a `tf.data` pipeline on TensorFlow; device-resident arrays on JAX."""
    if BACKEND == "tensorflow":
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True).repeat()
    count = len(images) // batch_size
    return [
        (keras.ops.convert_to_tensor(images[i * batch_size:(i + 1) * batch_size]),
         keras.ops.convert_to_tensor(labels[i * batch_size:(i + 1) * batch_size]))
        for i in range(count)
    ]


def _step_function(model, dataset):
    """The model's compiled train function on a persistent iterator: timing it measures the step, not `fit`'s
    per-call setup (iterator creation, callbacks, progress bar)."""
    if BACKEND == "tensorflow":
        model.make_train_function()
        iterator = iter(dataset)
        return lambda: model.train_function(iterator)
    # JAX: Keras's jitted train_function(state, iterator), threading the state as `fit` does.
    model.train_on_batch(*dataset[0])  # Builds the model, optimizer and metrics.
    state = [model._get_jax_state(trainable_variables=True, non_trainable_variables=True, optimizer_variables=True,
                                  metrics_variables=True)]
    iterator = itertools.cycle(dataset)

    def step():
        logs, state[0] = model.train_function(state[0], iterator)
        return logs

    return step


def _time_round(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        logs = step()
    keras.tree.map_structure(np.asarray, logs)  # Wait for the last step.
    return (time.perf_counter() - start) / steps


def measure(architecture, jit_compile, case_names, images, labels, batch_size, steps, rounds):
    """Returns {case: {"plain_ms", "case_ms", "ratio"}} for one architecture and XLA setting."""
    dataset = _dataset(images, labels, batch_size)
    plain = _step_function(_compiled_model(architecture, [], jit_compile), dataset)
    _time_round(plain, 3)  # Trace and compile outside the timed rounds.
    results = {}
    for name in case_names:
        model = _step_function(_compiled_model(architecture, _as_list(PENALTY_CASES[name]()), jit_compile), dataset)
        try:
            _time_round(model, 3)
        except kw.structure.StructureError as error:  # A penalty defined for other architectures only.
            results[name] = {"not_applicable": str(error)}
            print(f"{architecture:4s} jit={str(jit_compile):5s} {name:46s} n/a ({str(error)[:80]})", flush=True)
            continue
        plain_times, case_times = [], []
        for _ in range(rounds):
            plain_times.append(_time_round(plain, steps))
            case_times.append(_time_round(model, steps))
        # The fastest round of each: other processes can only add time, never remove it.
        plain_ms = 1e3 * min(plain_times)
        case_ms = 1e3 * min(case_times)
        results[name] = {"plain_ms": plain_ms, "case_ms": case_ms, "ratio": case_ms / plain_ms}
        print(
            f"{architecture:4s} jit={str(jit_compile):5s} {name:46s} plain {plain_ms:8.2f} ms  "
            f"penalty {case_ms:8.2f} ms  ratio {case_ms / plain_ms:5.2f}x",
            flush=True,
        )
    return results


def run_timings(case_names):
    """Times every case on every --architectures and --jit setting; prints one line per case."""
    unknown = [c for c in case_names if c not in PENALTY_CASES]
    if unknown:
        raise app.UsageError(f"--cases: unknown {unknown}; known: {', '.join(PENALTY_CASES)}")
    jit_values = []
    for value in FLAGS.jit:
        if value.lower() not in ("true", "false"):
            raise app.UsageError(f"--jit: expected true/false values, got {value!r}")
        jit_values.append(value.lower() == "true")
    if BACKEND == "jax":
        jit_values = [True]  # Keras's JAX trainer compiles every step with XLA.
    images, labels = _images_and_labels(FLAGS.batch_size, FLAGS.steps)
    print(f"backend {BACKEND}, TensorFlow {tf.__version__}, Keras {keras.__version__}, batch {FLAGS.batch_size}, "
          f"{FLAGS.steps} steps x {FLAGS.rounds} interleaved rounds, fastest round's per-step time")
    all_results = {}
    for architecture in FLAGS.architectures:
        for jit_compile in jit_values:
            all_results[f"{architecture}/jit={jit_compile}"] = measure(
                architecture, jit_compile, case_names, images, labels, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds
            )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as handle:
            json.dump(all_results, handle, indent=2)


# ---- Jacobian spectral-norm error (issue #3): relative error of each spectral setting vs the SVD ----------------------
flags.DEFINE_enum(
    "spectral_error", "also", ["also", "only", "skip"],
    "Report the relative error vs SVD of every jacobian_spectral_norm* case on the MLP (at initialization and after "
    "--spectral_error_epochs of training): 'also' (after the timings), 'only', or 'skip'.",
)
flags.DEFINE_integer("spectral_error_examples", 512, "Test examples for the spectral-norm error report.")
flags.DEFINE_integer("spectral_error_epochs", 1, "MNIST training epochs before the second error measurement.")


def spectral_error_report(case_names, data_dir, examples, epochs):
    """Mean and max relative error (σ_max − σ̂)/σ_max of each spectral case's estimate vs the SVD of the full
    per-example Jacobian, on the 784-1024-1024-10 MLP: at initialization, after `epochs` of SGD on MNIST, and after
    `epochs` of SGD with the default `JacobianSpectralNorm(0.01)` (whose flatter spectrum is the harder case)."""
    x_train, y_train = kw.data.load_arrays("mnist", "train", data_dir=data_dir)
    x_test, y_test = kw.data.load_arrays("mnist", "test", data_dir=data_dir)
    x_test, y_test = x_test[:examples], y_test[:examples]

    def fresh(regularizers):
        keras.utils.set_random_seed(0)
        model = _build("mlp")
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), regularizers=regularizers,
                      jit_compile=True)
        return model

    model = fresh([])
    results = {}
    for stage in ("init", f"trained_{epochs}ep", f"spectral_regularized_{epochs}ep"):
        if stage.startswith("trained"):
            model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)
        elif stage.startswith("spectral"):
            model = fresh([P.JacobianSpectralNorm(0.01)])
            model.fit(x_train, y_train, batch_size=128, epochs=epochs, verbose=0)
        for name in case_names:
            penalty = PENALTY_CASES[name]()
            estimate, exact = kw.analysis.jacobian_spectral_norm_estimates(model, x_test, y_test, penalty)
            relative = (exact - estimate) / exact
            results[f"{stage}/{name}"] = {"mean": float(relative.mean()), "max": float(relative.max())}
            print(f"spectral error mlp {stage:26s} {name:46s} method={penalty.method:15s} it={penalty.iterations} "
                  f"mean {relative.mean():9.2e}  max {relative.max():9.2e}  (mean σ_max {exact.mean():.3f})", flush=True)
    return results


# ---- XLA on or off (issue #15): the same model's step with and without XLA, timed interleaved ---------------------------
flags.DEFINE_bool(
    "xla_ratio", False,
    "Instead of penalty overheads: time each --architectures model's step without and with XLA in interleaved rounds, "
    "for the plain model and each --cases penalty (default: plain only), and print the XLA / no-XLA ratio.",
)


def xla_ratios(case_names, images, labels, batch_size, steps, rounds):
    """Returns {"<architecture>/<case>": {"no_xla_ms", "xla_ms", "ratio"}}: the fastest round's per-step time of the
    same model compiled without and with XLA, timed in alternating rounds so that load hits both alike."""
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True).repeat()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, batch {batch_size}, {steps} steps x {rounds} "
          "interleaved rounds (no XLA, XLA, no XLA, ...), fastest round's per-step time")
    results = {}
    for architecture in FLAGS.architectures:
        for name in ["plain", *case_names]:
            settings = {}
            try:
                for jit_compile in (False, True):
                    penalties = [] if name == "plain" else _as_list(PENALTY_CASES[name]())
                    settings[jit_compile] = _step_function(_compiled_model(architecture, penalties, jit_compile), dataset)
                    _time_round(settings[jit_compile], 3)  # Trace and compile outside the timed rounds.
            except kw.structure.StructureError as error:
                results[f"{architecture}/{name}"] = {"not_applicable": str(error)}
                print(f"{architecture:4s} {name:46s} n/a ({str(error)[:80]})", flush=True)
                continue
            times = {False: [], True: []}
            for _ in range(rounds):
                for jit_compile in (False, True):
                    times[jit_compile].append(_time_round(settings[jit_compile], steps))
            no_xla_ms, xla_ms = 1e3 * min(times[False]), 1e3 * min(times[True])
            results[f"{architecture}/{name}"] = {"no_xla_ms": no_xla_ms, "xla_ms": xla_ms, "ratio": xla_ms / no_xla_ms}
            print(f"{architecture:4s} {name:46s} no XLA {no_xla_ms:8.2f} ms  XLA {xla_ms:8.2f} ms  "
                  f"XLA/no-XLA {xla_ms / no_xla_ms:5.2f}x", flush=True)


# ---- The library's step against a hand-written XLA step of the same math -------------------------------------------
flags.DEFINE_enum(
    "handwritten", "also", ["also", "only", "skip"],
    "Compare keras_wssi.Model's compiled train step with a hand-written XLA train step of the same math (plain, "
    "input_gradient, jacobian_frobenius with one projection) on the MLP, interleaved in one process: 'also' (after the "
    "timings), 'only', or 'skip'.",
)
HANDWRITTEN_CASES = ("plain", "input_gradient", "jacobian_frobenius")


def _handwritten_step(model, case, dataset):
    """A train step written by hand with two GradientTapes: the same forward pass, loss, penalty and SGD update as
    the library's, no metrics, compiled with XLA; the batch is pulled from the iterator outside XLA, as Keras does."""
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    counter = tf.Variable([7, 0], dtype=tf.int64, trainable=False)
    strength = {"input_gradient": 0.1, "jacobian_frobenius": 0.01}.get(case)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            with tf.GradientTape(watch_accessed_variables=False) as input_tape:
                input_tape.watch(x)
                logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            if case == "input_gradient":
                cotangent = tf.nn.softmax(logits) - tf.one_hot(y, 10)
                rows = input_tape.gradient(logits, x, output_gradients=cotangent)
                loss += strength * tf.reduce_mean(tf.reduce_sum(tf.square(tf.reshape(rows, [tf.shape(x)[0], -1])), -1))
            elif case == "jacobian_frobenius":
                draw = tf.random.stateless_normal(tf.shape(logits), seed=counter, alg="philox")
                counter.assign_add([0, 1])
                directions = draw / tf.norm(draw, axis=-1, keepdims=True)
                rows = input_tape.gradient(logits, x, output_gradients=directions)
                value = 0.5 * 10.0 * tf.reduce_mean(tf.reduce_sum(tf.square(tf.reshape(rows, [tf.shape(x)[0], -1])), -1))
                loss += strength * value
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    iterator = iter(dataset)

    @tf.function
    def train_function():
        x, y = next(iterator)
        return step(x, tf.cast(y, tf.int32))

    return train_function


def _interleaved_ms(first, second, steps, rounds):
    """The fastest round's per-step milliseconds of two step functions, timed in alternating rounds after warm-up."""
    _time_round(first, 3)
    _time_round(second, 3)
    times = ([], [])
    for _ in range(rounds):
        times[0].append(_time_round(first, steps))
        times[1].append(_time_round(second, steps))
    return 1e3 * min(times[0]), 1e3 * min(times[1])


def handwritten_comparison(images, labels, batch_size, steps, rounds):
    """Prints library step / hand-written step for each case, both measured in interleaved rounds."""
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True).repeat()
    results = {}
    for case in HANDWRITTEN_CASES:
        penalties = {"plain": [], "input_gradient": [P.InputGradient(0.1)],
                     "jacobian_frobenius": [P.JacobianFrobenius(0.01, num_projections=1)]}[case]
        library = _step_function(_compiled_model("mlp", penalties, True), dataset)
        keras.utils.set_random_seed(0)
        handwritten = _handwritten_step(_build("mlp"), case, dataset)
        library_ms, handwritten_ms = _interleaved_ms(library, handwritten, steps, rounds)
        results[case] = {"library_ms": library_ms, "handwritten_ms": handwritten_ms, "ratio": library_ms / handwritten_ms}
        print(f"mlp  jit=True  library vs hand-written {case:22s} library {library_ms:8.2f} ms  hand-written "
              f"{handwritten_ms:8.2f} ms  ratio {library_ms / handwritten_ms:5.3f}x", flush=True)
    # Keras's own fit machinery (metrics, loss tracker, iterator handling) without keras_wssi: a plain keras.Model.
    keras.utils.set_random_seed(0)
    reference = _build("mlp")
    plain_keras = keras.Model(reference.inputs, reference.outputs)
    plain_keras.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        jit_compile=True)
    keras_step = _step_function(plain_keras, dataset)
    library = _step_function(_compiled_model("mlp", [], True), dataset)
    library_ms, keras_ms = _interleaved_ms(library, keras_step, steps, rounds)
    results["keras_model_plain"] = {"library_ms": library_ms, "keras_ms": keras_ms, "ratio": library_ms / keras_ms}
    print(f"mlp  jit=True  keras_wssi.Model vs keras.Model, no penalty: library {library_ms:8.2f} ms  keras.Model "
          f"{keras_ms:8.2f} ms  ratio {library_ms / keras_ms:5.3f}x", flush=True)
    return results


def _side_by_side(argv, backends):
    """Runs this script once per backend (each in its own process) and prints their ratios side by side."""
    results = {}
    runs = []
    for name in backends:
        if name == "jax" and FLAGS.jax_jvp:
            runs += [(f"jax/jvp={mode}", "jax", {"KERAS_WSSI_JAX_JVP": mode}) for mode in FLAGS.jax_jvp]
        else:
            runs.append((name, name, {}))
    with tempfile.TemporaryDirectory() as folder:
        for label, name, extra_environment in runs:
            out = os.path.join(folder, f"{label.replace('/', '_')}.json")
            child = [a for a in argv[1:] if not a.startswith(("--backend", "--json_out", "--handwritten", "--spectral_error", "--jax_jvp"))]
            command = [sys.executable, os.path.abspath(__file__), *child, f"--backend={name}", f"--json_out={out}",
                       "--handwritten=skip", "--spectral_error=skip"]
            print(f"--- {label} ---", flush=True)
            subprocess.run(command, env=dict(os.environ, KERAS_BACKEND=name, **extra_environment), check=True)
            with open(out) as handle:
                results[label] = json.load(handle)
    backends = [label for label, _, _ in runs]
    print("\nside by side (fastest round's per-step time; ratio = penalty step / plain step, same backend):")
    header = "".join(f"  {name + ' plain ms':>18s} {name + ' ratio':>16s}" for name in backends)
    print(f"{'setting':20s} {'case':40s}{header}")
    settings = sorted({k for r in results.values() for k in r})
    for setting in settings:
        cases = sorted({c for r in results.values() for c in r.get(setting, {})})
        for case in cases:
            cells = []
            for name in backends:
                entry = results[name].get(setting, {}).get(case)
                if entry is None or "ratio" not in entry:
                    cells.append(f"  {'n/a':>18s} {'n/a':>16s}")
                else:
                    cells.append(f"  {entry['plain_ms']:18.2f} {entry['ratio']:15.2f}x")
            print(f"{setting:20s} {case:40s}{''.join(cells)}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as handle:
            json.dump(results, handle, indent=2)


def main(argv):
    backends = FLAGS.backend or [BACKEND]
    unknown = [b for b in backends if b not in ("tensorflow", "jax")]
    if unknown:
        raise app.UsageError(f"--backend: unknown {unknown}; expected tensorflow and/or jax.")
    if backends != [BACKEND]:
        return _side_by_side(sys.argv, backends)
    del argv
    if BACKEND != "tensorflow":
        FLAGS.handwritten = "skip" if FLAGS.handwritten != "only" else "only"
        if FLAGS.xla_ratio or FLAGS.handwritten == "only":
            raise app.UsageError("--xla_ratio and --handwritten=only time TensorFlow steps: run them with --backend=tensorflow.")
    if FLAGS.xla_ratio:
        unknown = [c for c in FLAGS.cases if c not in PENALTY_CASES]
        if unknown:
            raise app.UsageError(f"--cases: unknown {unknown}; known: {', '.join(PENALTY_CASES)}")
        images, labels = _images_and_labels(FLAGS.batch_size, FLAGS.steps)
        results = xla_ratios(FLAGS.cases, images, labels, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds)
        if FLAGS.json_out:
            with open(FLAGS.json_out, "w") as handle:
                json.dump(results, handle, indent=2)
        return
    case_names = FLAGS.cases or list(PENALTY_CASES)
    if FLAGS.spectral_error != "only" and FLAGS.handwritten != "only":
        run_timings(case_names)
    if FLAGS.handwritten != "skip":
        images, labels = _images_and_labels(FLAGS.batch_size, FLAGS.steps)
        handwritten_comparison(images, labels, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds)
    if FLAGS.handwritten == "only":
        return
    if FLAGS.spectral_error != "skip":
        names = [n for n in case_names if n.startswith("jacobian_spectral_norm")]
        spectral_error_report(names, resolve_data_dir(FLAGS.data_dir), FLAGS.spectral_error_examples, FLAGS.spectral_error_epochs)


if __name__ == "__main__":
    app.run(main)
