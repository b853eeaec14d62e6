r"""Evaluates trained models for robustness and writes one report comparing them side by side.

Every flag has a default; a bare run evaluates the model that `examples/train.py` writes by default:

    python examples/train.py --data_dir=../shared/data            # writes runs/default/model.keras
    python examples/evaluate.py --data_dir=../shared/data         # writes reports/default/

Several models, more attacks:

    python examples/evaluate.py --data_dir=../shared/data \
        --models=runs/none/model.keras,runs/weissi/model.keras --attacks=fgsm,pgd,pgd_l2,cw_l2,square

The AutoAttack-style ensemble (APGD-CE, APGD-T, FAB-T, Square; keras_wssi's compiled implementations) at one ε,
recorded as the metrics section "autoattack" of each model (robust accuracy under the ensemble, per-attack
accuracies, forward passes, settings):

    python examples/evaluate.py --data_dir=../shared/data --autoattack=standard --autoattack_epsilon=0.1

Its attacks also run as ε-curves: --attacks=apgd_ce,apgd_t,fab_t,square_compiled (and *_l2; --apgd_steps,
--square_queries).

Gradient-masking checks run for every model by default (docs/gradient_masking.md; a model named `none`, or
--surrogate, is the transfer surrogate; --nodiagnostics skips them):

    python examples/evaluate.py --data_dir=../shared/data --models=runs/none/model.keras,runs/cure/model.keras \
        --names=none,cure --diagnostics --diagnostics_epsilon=0.1

Writes into --output_dir: `report.json` (every number with its settings, RobustBench-style fields per model under
`robustbench`), `summary.md` (tables),
`accuracy_vs_epsilon.png` (one panel per attack / noise family, one line per model) and `plots/`.
Gradient attacks are cleverhans's `tf2` functions, run batched and compiled by keras_wssi; `cw_l2` and
`square` come from the Adversarial Robustness Toolbox (`pip install "keras_wssi[attacks]"`).

Backends: KERAS_BACKEND=tensorflow (default) or jax. On JAX the gradient attacks are cleverhans.jax's (L∞ FGSM,
PGD, BIM, Madry) or keras_wssi's keras.ops transcription of cleverhans.tf2 (L2, MIM, custom losses), the ensemble
is the same compiled code, and the ART attacks (`cw_l2`, `square`, `square_l2`) are refused with the replacement
named (`fab_t_l2`, `square_compiled`, `square_compiled_l2`); every attack's settings record its `implementation`
and the `backend`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import keras_wssi as kw  # noqa: E402
from keras_wssi import evaluation  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["runs/default/model.keras"], "Comma-separated .keras files to compare.")
flags.DEFINE_list("names", [], "Report names of the models (default: each file's folder name).")
flags.DEFINE_string(
    "dataset", "", "mnist or fashion_mnist (default: what the models record: model.keras's data description, else "
    "the metrics.json beside it; refused when unknown or when it disagrees)."
)
flags.DEFINE_string(
    "data_dir", None, f"Folder with the raw IDX .gz files (offline). Default: ${kw.data.DATA_DIR_ENV}, else tensorflow-datasets."
)
flags.DEFINE_list("attacks", ["fgsm", "pgd", "pgd_l2"], "Attacks: " + ", ".join(evaluation.ATTACKS) + ".")
flags.DEFINE_list("epsilons", [str(e) for e in evaluation.robustness.DEFAULT_LINF_EPSILONS], "ε list of L∞ attacks.")
flags.DEFINE_list("l2_epsilons", [str(e) for e in evaluation.robustness.DEFAULT_L2_EPSILONS], "ε list of L2 attacks.")
flags.DEFINE_list("noise", ["gaussian", "uniform"], "Input noise kinds (empty for none).")
flags.DEFINE_list("noise_levels", [str(e) for e in evaluation.robustness.DEFAULT_NOISE_LEVELS], "Noise σ / half-widths.")
flags.DEFINE_integer("num_examples", 1000, "Test examples evaluated (0: the whole test set).")
flags.DEFINE_integer("train_examples", 1000, "Training examples for the generalization gap (0: skip).")
flags.DEFINE_integer("cw_examples", 100, "Examples for cw_l2 (slow: ART runs it in NumPy).")
flags.DEFINE_integer("square_examples", 200, "Examples for the Square attack.")
flags.DEFINE_integer("cw_max_iter", 50, "Optimizer steps per binary-search step of cw_l2.")
flags.DEFINE_integer("cw_binary_search_steps", 5, "Binary-search steps over the CW constant.")
flags.DEFINE_integer("square_max_iter", 300, "Queries (iterations) of the Square attack per ε.")
flags.DEFINE_integer("jacobian_examples", 256, "Test examples for the Jacobian statistics (0: skip).")
flags.DEFINE_integer("pgd_steps", 40, "Iterations of pgd, pgd_l2 and madry.")
flags.DEFINE_integer("restarts", 1, "Random restarts of pgd / pgd_l2 / madry.")
flags.DEFINE_integer("batch_size", 500, "Examples per compiled attack call (bounds memory).")
flags.DEFINE_integer("seed", 0, "Seed of random starts, noise and ART's sampling.")
flags.DEFINE_boolean("jit_compile", False, "Compile attack graphs with XLA (measured slower on CPU for convolutions).")
flags.DEFINE_boolean("recover_logits", False, "Accept softmax-output models by recovering logits (announced).")
flags.DEFINE_enum("autoattack", "", ["", "standard", "fast"], "Run the AutoAttack-style ensemble (empty: off).")
flags.DEFINE_enum("autoattack_norm", "linf", ["linf", "l2"], "Threat model of the ensemble.")
flags.DEFINE_float("autoattack_epsilon", 0.1, "ε of the ensemble.")
flags.DEFINE_integer("autoattack_examples", 1000, "Test examples for the ensemble (0: all of --num_examples).")
flags.DEFINE_integer("autoattack_square_queries", 0, "Square queries in the ensemble (0: the version's, 5000/1000).")
flags.DEFINE_integer("autoattack_targets", 0, "Target classes of APGD-T / FAB-T (0: the version's, 9/3).")
flags.DEFINE_integer("apgd_steps", 100, "Iterations of apgd_* and fab_t* in --attacks curves and the ensemble.")
flags.DEFINE_integer("square_queries", 5000, "Queries of square_compiled in --attacks curves.")
flags.DEFINE_boolean("weight_perturbation", False, "Also evaluate accuracy under weight perturbations.")
flags.DEFINE_list("weight_epsilons", ["0", "0.01", "0.02", "0.05", "0.1"], "Relative weight-perturbation radii.")
flags.DEFINE_list("weight_kinds", ["random", "adversarial"], "Weight-perturbation kinds.")
flags.DEFINE_boolean("diagnostics", True, "Run the gradient-masking checks on every model (docs/gradient_masking.md; "
                     "--nodiagnostics skips them).")
flags.DEFINE_float("diagnostics_epsilon", 0.1, "ε of the gradient-masking checks (and of the RobustBench-style fields).")
flags.DEFINE_enum("threat_model", "linf", ["linf", "l2"], "Norm of the RobustBench-style fields and of the checks.")
flags.DEFINE_integer("diagnostics_examples", 500, "Test examples for the gradient-masking checks.")
flags.DEFINE_integer("diagnostics_strong_steps", 100, "PGD steps of the checks' 'more steps and restarts' attack.")
flags.DEFINE_integer("diagnostics_square_examples", 200, "Examples for the Square attack of the checks.")
flags.DEFINE_string("surrogate", "", "Unregularized .keras model for the transfer check (default: a model named "
                    "'none' among --models, else the check is skipped).")
flags.DEFINE_string("output_dir", "reports/default", "Where report.json, summary.md and the plots go.")
flags.DEFINE_string("title", "Robustness report", "Report title.")
flags.DEFINE_boolean("progress", True, "Progress bars.")

for _name in ("num_examples", "train_examples", "cw_examples", "square_examples", "jacobian_examples",
              "autoattack_examples", "autoattack_square_queries", "autoattack_targets"):
    flags.register_validator(_name, lambda value: value >= 0, message=f"--{_name} must be >= 0.")
for _name in ("pgd_steps", "restarts", "batch_size", "cw_max_iter", "cw_binary_search_steps", "square_max_iter",
              "apgd_steps", "square_queries"):
    flags.register_validator(_name, lambda value: value >= 1, message=f"--{_name} must be >= 1.")


def _floats(values, flag):
    try:
        return [float(v) for v in values if v.strip()]
    except ValueError:
        raise app.UsageError(f"--{flag} must be comma-separated numbers, got {','.join(values)!r}.") from None


def _attack(name):
    if name not in evaluation.ATTACKS:
        raise app.UsageError(f"--attacks: unknown attack {name!r}; expected names from {', '.join(evaluation.ATTACKS)}.")
    settings = {}
    if name in ("pgd", "pgd_l2", "madry"):
        settings["nb_iter"] = FLAGS.pgd_steps
    if name in ("pgd", "pgd_l2", "madry") and FLAGS.restarts > 1:
        settings["restarts"] = FLAGS.restarts
    if name == "cw_l2":
        settings.update(max_iter=FLAGS.cw_max_iter, binary_search_steps=FLAGS.cw_binary_search_steps)
    if name in ("square", "square_l2"):
        settings["max_iter"] = FLAGS.square_max_iter
    if name.startswith(("apgd_", "fab_t")):
        settings["nb_iter"] = FLAGS.apgd_steps
    if name.startswith("square_compiled"):
        settings["nb_iter"] = FLAGS.square_queries
    return evaluation.get_attack(name, **settings)


def _autoattack_budget():
    budget = {"apgd_ce": {"nb_iter": FLAGS.apgd_steps}, "apgd_t": {"nb_iter": FLAGS.apgd_steps}}
    if FLAGS.autoattack == "standard":
        budget["fab_t"] = {"nb_iter": FLAGS.apgd_steps}
    if FLAGS.autoattack_targets:
        for name in ("apgd_t", "fab_t"):
            if name in budget:
                budget[name]["n_targets"] = FLAGS.autoattack_targets
    if FLAGS.autoattack_square_queries:
        budget["square_compiled"] = {"nb_iter": FLAGS.autoattack_square_queries}
    return budget


def _autoattack_metrics(model, images, labels):
    """The ensemble's JSON-ready summary for the report (per-example flags left out)."""
    count = FLAGS.autoattack_examples or len(images)
    result = evaluation.autoattack(
        model, images[:count], labels[:count], FLAGS.autoattack_epsilon, norm=FLAGS.autoattack_norm,
        version=FLAGS.autoattack, seed=FLAGS.seed, batch_size=FLAGS.batch_size, budget=_autoattack_budget(),
        jit_compile=FLAGS.jit_compile, recover_logits=FLAGS.recover_logits, progress=FLAGS.progress,
    )
    return {key: value for key, value in result.items() if key not in ("robust", "clean_correct", "per_attack_robust")}


def _weight_perturbation_module():
    try:
        from keras_wssi.evaluation import weight_perturbation
    except ImportError as error:
        raise app.UsageError(
            f"--weight_perturbation needs keras_wssi.evaluation.weight_perturbation, which is not available ({error})."
        ) from error
    if not hasattr(weight_perturbation, "evaluate_weight_perturbations"):
        raise app.UsageError("keras_wssi.evaluation.weight_perturbation has no evaluate_weight_perturbations().")
    return weight_perturbation


def _dataset_of(paths, metadata):
    """The data set the models were trained on, read from what they carry; never guessed."""
    recorded = []
    for path, extra in zip(paths, metadata):
        description = kw.data.read_description(path) or {}
        recorded.append(description.get("dataset") or (extra or {}).get("dataset"))
    if FLAGS.dataset:
        wrong = [f"{p} ({d})" for p, d in zip(paths, recorded) if d is not None and d != FLAGS.dataset]
        if wrong:
            raise app.UsageError(f"--dataset={FLAGS.dataset}, but these models were trained on another: {', '.join(wrong)}.")
        return FLAGS.dataset
    unknown = [p for p, d in zip(paths, recorded) if d is None]
    if unknown:
        raise app.UsageError(
            f"{', '.join(unknown)} do(es) not record its data set (no data description in the file, no metrics.json "
            "beside it): pass --dataset=mnist or --dataset=fashion_mnist."
        )
    if len(set(recorded)) > 1:
        raise app.UsageError(f"The models were trained on different data sets ({', '.join(sorted(set(recorded)))}): evaluate them apart.")
    return recorded[0]


def run(argv):
    """Evaluates FLAGS.models and writes the report; returns the written paths."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    models = [m.strip() for m in FLAGS.models if m.strip()]
    if not models:
        raise app.UsageError("--models is empty: give at least one .keras file.")
    names = [n.strip() for n in FLAGS.names if n.strip()]
    if names and len(names) != len(models):
        raise app.UsageError(f"--names has {len(names)} entries for {len(models)} models.")
    if not names:
        names = [os.path.basename(os.path.dirname(os.path.abspath(m))) or m for m in models]
        if len(set(names)) != len(names):
            names = models
    attacks = [_attack(a.strip()) for a in FLAGS.attacks if a.strip()]
    noise = [k.strip() for k in FLAGS.noise if k.strip()]
    for kind in noise:
        if kind not in evaluation.NOISE_KINDS:
            raise app.UsageError(f"--noise: unknown kind {kind!r}; expected {', '.join(evaluation.NOISE_KINDS)}.")
    linf = _floats(FLAGS.epsilons, "epsilons")
    l2 = _floats(FLAGS.l2_epsilons, "l2_epsilons")
    levels = _floats(FLAGS.noise_levels, "noise_levels")
    weight_module = _weight_perturbation_module() if FLAGS.weight_perturbation else None

    loaded = [evaluation.load_model(path) for path in models]
    dataset = _dataset_of(models, [metadata for _, metadata in loaded])
    images, labels = kw.data.load_arrays(dataset, "test", data_dir=FLAGS.data_dir)
    if FLAGS.num_examples:
        images, labels = images[: FLAGS.num_examples], labels[: FLAGS.num_examples]
    train_images = train_labels = None
    if FLAGS.train_examples:
        train_images, train_labels = kw.data.load_arrays(dataset, "train", data_dir=FLAGS.data_dir)
        train_images, train_labels = train_images[: FLAGS.train_examples], train_labels[: FLAGS.train_examples]

    report = evaluation.Report(
        FLAGS.title,
        settings={
            "dataset": dataset,
            "test_examples": len(images),
            "train_examples": 0 if train_images is None else len(train_images),
            "seed": FLAGS.seed,
            "command": " ".join(["python", "examples/evaluate.py"] + sys.argv[1:]),
        },
    )
    report.set_threat_model(FLAGS.threat_model, FLAGS.diagnostics_epsilon)
    surrogate = None
    if FLAGS.diagnostics:
        if FLAGS.surrogate:
            surrogate = evaluation.load_model(FLAGS.surrogate)[0]
        elif "none" in names:
            surrogate = loaded[names.index("none")][0]
    diagnostics = None
    if FLAGS.diagnostics:
        diagnostics = {"epsilon": FLAGS.diagnostics_epsilon, "norm": FLAGS.threat_model,
                       "steps": FLAGS.pgd_steps, "examples": FLAGS.diagnostics_examples,
                       "strong_steps": FLAGS.diagnostics_strong_steps,
                       "square_examples": FLAGS.diagnostics_square_examples,
                       "square_queries": FLAGS.square_max_iter}
        if FLAGS.autoattack:
            # The ensemble joins the checks' white-box worst case (per example: robust only if it survives).
            diagnostics["extra_attacks"] = (evaluation.diagnostics.ExtraAttack(
                "AutoAttack",
                lambda model, x, y, eps, norm, seed: evaluation.autoattack(
                    model, x, y, eps, norm=norm, version=FLAGS.autoattack, seed=seed, batch_size=FLAGS.batch_size,
                    budget=_autoattack_budget(), recover_logits=FLAGS.recover_logits)["robust"],
                (("version", FLAGS.autoattack), ("implementation", "keras_wssi.evaluation.autoattack")),
            ),)
    for name, path, (model, training_metrics) in zip(names, models, loaded):
        logging.info("Evaluating %s (%s)", name, path)
        evaluation.evaluate_model(
            report,
            name,
            model,
            images,
            labels,
            attacks=attacks,
            linf_epsilons=linf,
            l2_epsilons=l2,
            noise_kinds=noise,
            noise_levels=levels,
            train_images=train_images,
            train_labels=train_labels,
            jacobian_examples=FLAGS.jacobian_examples,
            attack_examples={"cw_l2": FLAGS.cw_examples or len(images), "square": FLAGS.square_examples or len(images)},
            batch_size=FLAGS.batch_size,
            seed=FLAGS.seed,
            jit_compile=FLAGS.jit_compile,
            recover_logits=FLAGS.recover_logits,
            source=path,
            training_metrics=training_metrics,
            progress=FLAGS.progress,
            diagnostics=None if diagnostics is None else dict(
                diagnostics, surrogate_name=os.path.basename(FLAGS.surrogate) if FLAGS.surrogate else "none"),
            surrogate=surrogate,
        )
        if FLAGS.autoattack:
            report.set_metrics(name, "autoattack", _autoattack_metrics(model, images, labels))
        if weight_module is not None:
            for kind in FLAGS.weight_kinds:
                curve = weight_module.evaluate_weight_perturbations(
                    model, images, labels, _floats(FLAGS.weight_epsilons, "weight_epsilons"), kind=kind,
                    batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                )
                report.add_curve(name, f"weights/{kind}", curve)
            evaluation.report.add_certified_weight_curve(report, name, model, images, labels, _floats(FLAGS.weight_epsilons, "weight_epsilons"))
    paths = report.save(FLAGS.output_dir)
    print(report.markdown())
    print(f"Wrote {paths['json']}, {paths['markdown']}" + (f", {paths['plot']}" if "plot" in paths else ""))
    return paths


def main(argv):
    try:
        run(argv)
    except (evaluation.EvaluationError, kw.data.DataError) as error:
        raise app.UsageError(str(error)) from error


if __name__ == "__main__":
    app.run(main)
