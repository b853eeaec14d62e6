"""One call per model: clean metrics, generalization gap, Jacobian statistics, attack and noise curves."""

import json
import os

import numpy as np

from keras_wssi.analysis import jacobian as analysis_jacobian
from keras_wssi.analysis.slope import spectral_norm_from_jacobian
from keras_wssi.evaluation import attacks as attacks_module
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.evaluation.noise import noise_accuracy
from keras_wssi.evaluation.runner import AttackRunner
from keras_wssi.evaluation.runner import check_dataset
from keras_wssi.evaluation.runner import clean_metrics

__all__ = [
    "DEFAULT_L2_EPSILONS",
    "DEFAULT_LINF_EPSILONS",
    "DEFAULT_NOISE_LEVELS",
    "evaluate_model",
    "jacobian_statistics",
    "load_model",
]

DEFAULT_LINF_EPSILONS = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2)
DEFAULT_L2_EPSILONS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_NOISE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5)


def load_model(path):
    """Loads a `.keras` file (keras_wssi objects registered), with a clear error for a missing or bad file.

    Returns:
        `(model, training_metrics)`: the model and the `metrics.json` written beside it by
        `examples/train.py` (None when absent).

    Example:

    ```python
    model, training_metrics = load_model("runs/default/model.keras")
    ```
    """
    import keras

    # keras_wssi's model classes are registered by now: importing this module imported the keras_wssi package.
    if not isinstance(path, str) or not path.endswith(".keras"):
        raise EvaluationError(f"model path must be a .keras file, got {path!r}.")
    if not os.path.isfile(path):
        raise EvaluationError(
            f"No model at {path!r}: train one first (python examples/train.py --output_dir={os.path.dirname(path) or '.'})."
        )
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for one cause: the file is not a loadable model.
        raise EvaluationError(f"Could not load {path!r} as a Keras model: {type(error).__name__}: {error}") from error
    metrics_path = os.path.join(os.path.dirname(path), "metrics.json")
    training_metrics = None
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            training_metrics = json.load(handle)
    return model, training_metrics


def jacobian_statistics(model, images, batch_size=64):
    """Per-example statistics of the logit Jacobian `J = ∂z/∂x`: σ_max (`||J||_2`) and `||J||_F`.

    Uses the full per-example Jacobian of `keras_wssi.analysis.input_jacobian` and the package's one per-example
    spectral norm (`keras_wssi.linalg.spectral_norm_squared`, in float64).

    Args:
        model: a Keras classifier outputting logits.
        images: the inputs at which `J` is measured.
        batch_size: examples per Jacobian computation (memory grows with `C × batch_size`).

    Returns:
        `(statistics, note)`: a dict of means, medians and 90th percentiles, and a note saying which code
        computed it.

    Example:

    ```python
    stats, note = jacobian_statistics(model, x_test[:256])
    stats["spectral_norm_mean"]
    ```
    """
    images = np.asarray(images, dtype=np.float32)
    if len(images) == 0:
        raise EvaluationError("jacobian_statistics needs at least one example, got an empty array.")
    source = "keras_wssi.analysis.input_jacobian + keras_wssi.analysis.slope's spectral norm (float64)"
    jacobians = analysis_jacobian.input_jacobian(model, images, batch_size=batch_size)
    jacobians = jacobians.reshape(jacobians.shape[0], jacobians.shape[1], -1)
    spectral = spectral_norm_from_jacobian(jacobians)
    frobenius = np.sqrt(np.square(jacobians).sum(axis=(1, 2)))
    statistics = {"examples": len(images), "source": source}
    for key, values in (("spectral_norm", spectral), ("frobenius_norm", frobenius)):
        statistics[f"{key}_mean"] = float(values.mean())
        statistics[f"{key}_median"] = float(np.median(values))
        statistics[f"{key}_p90"] = float(np.percentile(values, 90))
    return statistics, f"Jacobian statistics computed by {source}."


def evaluate_model(
    report,
    name,
    model,
    images,
    labels,
    attacks=("fgsm", "pgd"),
    linf_epsilons=DEFAULT_LINF_EPSILONS,
    l2_epsilons=DEFAULT_L2_EPSILONS,
    noise_kinds=("gaussian", "uniform"),
    noise_levels=DEFAULT_NOISE_LEVELS,
    train_images=None,
    train_labels=None,
    jacobian_examples=256,
    attack_examples=None,
    batch_size=256,
    seed=0,
    jit_compile=False,
    recover_logits=False,
    source=None,
    training_metrics=None,
    progress=True,
):
    """Evaluates one model into `report`: clean metrics, gap, Jacobian statistics, attack and noise curves.

    Args:
        report: a `Report`.
        name: the model's name in the report.
        model: a Keras classifier outputting logits.
        images: test inputs in `[0, 1]`.
        labels: test labels.
        attacks: attack names or `Attack`s (see `get_attack`).
        linf_epsilons: ε list of the L∞ attacks.
        l2_epsilons: ε list of the L2 attacks.
        noise_kinds: `"gaussian"` and/or `"uniform"`.
        noise_levels: noise levels (σ or half-width).
        train_images: training inputs for the generalization gap (optional).
        train_labels: training labels.
        jacobian_examples: test examples for the Jacobian statistics (0 skips them).
        attack_examples: per-attack example counts `{name: n}` (e.g. fewer for CW-L2); default all.
        batch_size: examples per compiled call.
        seed: seed of random starts and noise.
        jit_compile: XLA for the attack graphs.
        recover_logits: accept softmax outputs (announced in the report's notes).
        source: where the model came from (path), recorded.
        training_metrics: the training script's `metrics.json` content, recorded as is.
        progress: progress bars.

    Returns:
        The model's entry in the report.

    Example:

    ```python
    report = Report("MNIST")
    evaluate_model(report, "weissi", model, x_test[:1000], y_test[:1000], attacks=["fgsm", "pgd"])
    report.save("reports/mnist")
    ```
    """
    images, labels = check_dataset(images, labels, model)
    attack_objects = [attacks_module.get_attack(a) for a in attacks]
    linf_epsilons = attacks_module.check_epsilons(linf_epsilons, "linf_epsilons")
    l2_epsilons = attacks_module.check_epsilons(l2_epsilons, "l2_epsilons")
    entry = report.add_model(name, source=source)
    _, note = attacks_module.logits_function(model, images[:64], recover_logits=recover_logits)
    if note:
        report.add_note(name, note)
    clean = clean_metrics(model, images, labels, batch_size=batch_size, recover_logits=recover_logits)
    report.set_metrics(name, "clean", clean)
    if train_images is not None:
        train = clean_metrics(model, train_images, train_labels, batch_size=batch_size, recover_logits=recover_logits)
        report.set_metrics(name, "train", train)
        report.set_metrics(
            name,
            "generalization_gap",
            {"accuracy": train["accuracy"] - clean["accuracy"], "loss": clean["loss"] - train["loss"]},
        )
    if training_metrics:
        report.set_metrics(name, "training_script", training_metrics)
    if jacobian_examples:
        statistics, note = jacobian_statistics(model, images[:jacobian_examples])
        if statistics is not None:
            report.set_metrics(name, "jacobian", statistics)
        report.add_note(name, note)
    attack_examples = dict(attack_examples or {})
    for attack in attack_objects:
        count = attack_examples.get(attack.name, len(images))
        epsilons = linf_epsilons if attack.norm == "linf" else l2_epsilons
        runner = AttackRunner(model, attack, batch_size=batch_size, seed=seed, jit_compile=jit_compile,
                              recover_logits=recover_logits, progress=progress)
        report.add_curve(name, f"attack/{attack.name}", runner.robust_accuracy(images[:count], labels[:count], epsilons))
    for kind in noise_kinds:
        curve = noise_accuracy(model, images, labels, noise_levels, kind=kind, batch_size=batch_size, seed=seed,
                               recover_logits=recover_logits)
        report.add_curve(name, f"noise/{kind}", curve)
    return entry
