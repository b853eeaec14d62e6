"""Gradient-masking diagnostics: is a model's robustness real, or do its gradients just hide the attacks?

A model can look robust to gradient attacks because its gradients are zero, noisy or saturated ("gradient
masking", "obfuscated gradients") while adversarial examples still exist. Athalye, Carlini & Wagner (2018,
"Obfuscated gradients give a false sense of security") and Carlini et al. (2019, "On evaluating adversarial
robustness") list symptoms that any honest evaluation checks; `gradient_masking_checks` runs five of them
(DESIGN.md §1.6) on one model at one ε and says in words which fail:

1. **iterative ≥ single-step**: PGD (iterative) must break at least as many examples as FGSM (one step);
   a single step winning means the loss surface is not what the gradients say.
2. **accuracy → 0 as ε grows**: at a huge ε (L∞ 0.5 on `[0, 1]` inputs can turn every image into the same
   gray image) PGD must drive accuracy to ~0; if it cannot, the gradients do not lead anywhere.
3. **more steps and restarts change little**: a PGD with `strong_steps` steps and `strong_restarts` random
   restarts must not be much stronger than the PGD used for the numbers; otherwise those numbers were not
   converged.
4. **gradient-free not stronger**: the Square attack (no gradients; ART's on TensorFlow, keras_wssi's compiled
   one on JAX) must not beat the worst case of the
   white-box gradient attacks; if it does, the gradients were misleading the white-box attacks.
5. **transfer not stronger**: PGD run on an unregularized surrogate model and transferred must not beat
   white-box PGD on the model itself (skipped when no surrogate is given).

A check fails when the "should be weaker" attack leaves accuracy lower than the "should be stronger" one by
more than `tolerance` (absolute accuracy, default 0.05), or, for check 2, when accuracy at the huge ε exceeds
`unbounded_accuracy` (default 0.10). Every attack is evaluated per example on the same images, and the white-box
reference of checks 4 and 5 is the per-example worst case over all white-box attacks run (FGSM, PGD, strong
PGD and every attack in `WHITE_BOX_ATTACKS` or `extra_attacks`).

The attack ensemble (AutoAttack-style APGD-CE / APGD-T / FAB-T / Square) plugs in as one more white-box
attack: a function `(model, images, labels, epsilon, norm, seed) -> per-example correctness (bool array)`,
registered with `register_white_box_attack(name, function, settings)` or passed in `extra_attacks`.
"""

import dataclasses
import importlib.util
import time

import numpy as np

from keras_wssi import backend
from keras_wssi.evaluation import attacks as attacks_module
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.evaluation.report import attack_display_name
from keras_wssi.evaluation.runner import AttackRunner
from keras_wssi.evaluation.runner import check_dataset
from keras_wssi.evaluation.runner import predict_correct

__all__ = [
    "CHECKS",
    "DEFAULT_LARGE_EPSILONS",
    "WHITE_BOX_ATTACKS",
    "ExtraAttack",
    "gradient_masking_checks",
    "register_white_box_attack",
    "summary_sentence",
]

# Check name → what it states, in words (the report prints these).
CHECKS = {
    "iterative_beats_single_step": "iterative attack (PGD) at least as strong as single-step (FGSM)",
    "unbounded_epsilon": "accuracy goes to ~0 as ε grows",
    "more_steps_and_restarts": "more PGD steps and restarts change little",
    "gradient_free_not_stronger": "gradient-free attack (Square) not much stronger than the gradient attacks",
    "transfer_not_stronger": "transfer from an unregularized surrogate not stronger than white-box",
}

# "Unbounded" budgets for [0, 1] inputs: L∞ 0.5 moves any image to the constant-0.5 image; L2 14 ≥ 0.5·√784 does
# the same for MNIST-sized inputs (pass large_epsilon for larger inputs).
DEFAULT_LARGE_EPSILONS = {"linf": 0.5, "l2": 14.0}


@dataclasses.dataclass(frozen=True)
class ExtraAttack:
    """A white-box attack added to the diagnostics (e.g. the AutoAttack-style ensemble).

    Attributes:
        name: the name the report shows.
        function: `function(model, images, labels, epsilon, norm, seed)` returning a boolean array, one entry
            per example, True where the model still classifies the attacked example correctly.
        settings: JSON-ready settings recorded in the report (iterations, restarts, forward passes, …).
    """

    name: str
    function: object
    settings: tuple = ()


# name → ExtraAttack; every entry joins the white-box worst case of every diagnostics run.
WHITE_BOX_ATTACKS = {}


def register_white_box_attack(name, function, settings=None):
    """Adds a white-box attack to every diagnostics run (the hook for the attack ensemble).

    Args:
        name: report name, e.g. `"autoattack"`.
        function: `function(model, images, labels, epsilon, norm, seed) -> bool array (N,)`, True where the
            example survives the attack.
        settings: dict of JSON-ready settings to record.

    Example:

    ```python
    register_white_box_attack(
        "autoattack",
        lambda model, x, y, eps, norm, seed: my_ensemble(model, x, y, eps, norm=norm, seed=seed),
        {"attacks": ["apgd-ce", "apgd-t", "fab-t", "square"]},
    )
    ```
    """
    if not isinstance(name, str) or not name:
        raise EvaluationError(f"name must be a non-empty string, got {name!r}.")
    if not callable(function):
        raise EvaluationError(f"function of white-box attack {name!r} must be callable, got {type(function).__name__}.")
    WHITE_BOX_ATTACKS[name] = ExtraAttack(name, function, tuple(sorted((settings or {}).items())))
    return WHITE_BOX_ATTACKS[name]


def _predict_correct(logits_fn, images, labels, batch_size, variables=()):
    return predict_correct(logits_fn, images, labels, batch_size, variables=variables)


def _forward_passes(attack, examples):
    """Forward (and backward) passes an attack spends: exact for the fixed-step cleverhans attacks, an upper
    bound for Square (ART stops querying an example once it is broken)."""
    if attack.library == "cleverhans":
        return {"forward_passes": examples * attack.restarts * (attack.nb_iter + 1),
                "gradient_evaluations": examples * attack.restarts * attack.nb_iter, "exact": True}
    queries = attack.nb_iter if attack.library == "keras_wssi" else dict(attack.options).get("max_iter", 0)
    return {"forward_passes": examples * attack.restarts * (queries + 1), "gradient_evaluations": 0, "exact": False}


def _run(name, runner_or_function, model, images, labels, eps, norm, seed, batch_size, logits_fn, surrogate=None):
    started = time.perf_counter()
    if isinstance(runner_or_function, ExtraAttack):
        correct = np.asarray(runner_or_function.function(model, images, labels, eps, norm, seed), dtype=bool)
        if correct.shape != (len(images),):
            raise EvaluationError(
                f"White-box attack {name!r} returned shape {correct.shape}; expected one boolean per example "
                f"({len(images)},)."
            )
        settings = dict(runner_or_function.settings)
    else:
        x_adv = runner_or_function.generate(images, labels, eps)
        correct = _predict_correct(logits_fn, x_adv, labels, batch_size, model.variables)
        settings = runner_or_function.settings()
        settings.update(_forward_passes(runner_or_function.attack, len(images)))
        if surrogate is not None:
            settings["surrogate"] = surrogate
    return {
        "name": name,
        "epsilon": float(eps),
        "accuracy": float(correct.mean()),
        "examples": int(len(images)),
        "settings": settings,
        "seconds": time.perf_counter() - started,
    }, correct


def _check(name, passed, message, **values):
    return {"check": name, "description": CHECKS[name], "passed": passed, "message": message,
            **{k: (None if v is None else float(v)) for k, v in values.items()}}


def gradient_masking_checks(
    model,
    images,
    labels,
    epsilon=0.1,
    norm="linf",
    large_epsilon=None,
    steps=20,
    strong_steps=100,
    strong_restarts=2,
    square_queries=300,
    square_examples=None,
    surrogate=None,
    surrogate_name="surrogate",
    extra_attacks=(),
    tolerance=0.05,
    unbounded_accuracy=0.10,
    batch_size=256,
    seed=0,
    recover_logits=False,
):
    """Runs the five gradient-masking checks on one model; says which fail, and why, in words.

    Args:
        model: a Keras classifier outputting logits.
        images: test inputs in `[0, 1]`.
        labels: integer labels.
        epsilon: the perturbation size the robustness claim is made at.
        norm: `"linf"` (FGSM, PGD, Square) or `"l2"` (FGM-L2, PGD-L2; Square is L∞-only in this runner,
            so check 4 is skipped).
        large_epsilon: the "unbounded" ε of check 2 (default `DEFAULT_LARGE_EPSILONS[norm]`).
        steps: PGD steps of the base attack (checks 1, 2, 5 and the base of 3).
        strong_steps: PGD steps of the strong attack of check 3.
        strong_restarts: random restarts of the strong attack.
        square_queries: Square's iterations (queries per example).
        square_examples: examples for Square (ART runs it in NumPy; default all); checks compare on the same
            subset.
        surrogate: an unregularized model of the same data for the transfer check (None skips it).
        surrogate_name: its name in the report.
        extra_attacks: `ExtraAttack`s added to the white-box worst case (as well as `WHITE_BOX_ATTACKS`).
        tolerance: the accuracy margin a "should be weaker" attack may beat the stronger one by.
        unbounded_accuracy: the accuracy at `large_epsilon` above which check 2 fails.
        batch_size: examples per compiled attack call.
        seed: seed of random starts and of ART's sampling.
        recover_logits: accept a softmax output (see `logits_function`).

    Returns:
        `{"passed": bool, "failed": [names], "checks": [...], "attacks": [...], "white_box_accuracy",
        "epsilon", "norm", "summary"}`: `passed` is True when no check that ran failed; `attacks` holds every
        attack's accuracy, settings and forward-pass count.

    Example:

    ```python
    result = gradient_masking_checks(model, x_test[:500], y_test[:500], epsilon=0.1, surrogate=plain_model)
    result["passed"], result["summary"]
    ```
    """
    images, labels = check_dataset(images, labels, model)
    if norm not in DEFAULT_LARGE_EPSILONS:
        raise EvaluationError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    epsilon = attacks_module.check_epsilons([epsilon], "epsilon")[0]
    if epsilon <= 0:
        raise EvaluationError(f"epsilon must be > 0 for the diagnostics, got {epsilon!r}.")
    large_epsilon = DEFAULT_LARGE_EPSILONS[norm] if large_epsilon is None else large_epsilon
    large_epsilon = attacks_module.check_epsilons([large_epsilon], "large_epsilon")[0]
    if large_epsilon <= epsilon:
        raise EvaluationError(f"large_epsilon ({large_epsilon}) must exceed epsilon ({epsilon}).")
    for value, name in ((tolerance, "tolerance"), (unbounded_accuracy, "unbounded_accuracy")):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise EvaluationError(f"{name} must be an accuracy margin in [0, 1), got {value!r}.")
    for value, name in ((steps, "steps"), (strong_steps, "strong_steps"), (strong_restarts, "strong_restarts"),
                        (square_queries, "square_queries")):
        if not isinstance(value, int) or value < 1:
            raise EvaluationError(f"{name} must be a positive integer, got {value!r}.")
    if surrogate is not None:
        check_dataset(images[:1], labels[:1], surrogate)
    extra = list(WHITE_BOX_ATTACKS.values()) + list(extra_attacks)
    for attack in extra:
        if not isinstance(attack, ExtraAttack):
            raise EvaluationError(f"extra_attacks must hold ExtraAttack objects, got {type(attack).__name__}.")

    logits_fn, _ = attacks_module.logits_function(model, images[:64], recover_logits=recover_logits)
    suffix = "" if norm == "linf" else "_l2"
    single = attacks_module.get_attack("fgsm" if norm == "linf" else "fgm_l2")
    base = attacks_module.get_attack("pgd" + suffix, nb_iter=steps, rand_init=True)
    strong = attacks_module.get_attack("pgd" + suffix, nb_iter=strong_steps, rand_init=True, restarts=strong_restarts)

    def runner(attack, target=model):
        return AttackRunner(target, attack, batch_size=batch_size, seed=seed, progress=False,
                            recover_logits=recover_logits)

    common = dict(model=model, images=images, labels=labels, norm=norm, seed=seed, batch_size=batch_size,
                  logits_fn=logits_fn)
    clean = _predict_correct(logits_fn, images, labels, batch_size, model.variables)
    results, correct = {}, {}
    for key, attack, eps in (("single_step", single, epsilon), ("iterative", base, epsilon),
                             ("strong", strong, epsilon), ("large_epsilon", base, large_epsilon)):
        display = attack_display_name(attack.settings()) + (f" at ε={eps:g}" if key == "large_epsilon" else "")
        results[key], correct[key] = _run(display, runner(attack), eps=eps, **common)
    for attack in extra:
        results[attack.name], correct[attack.name] = _run(attack.name, attack, eps=epsilon, **common)
    white_box_keys = ["single_step", "iterative", "strong"] + [a.name for a in extra]
    white_box = np.logical_and.reduce([clean] + [correct[k] for k in white_box_keys])

    if surrogate is not None:
        transfer_name = f"{attack_display_name(base.settings())} transferred from {surrogate_name}"
        results["transfer"], correct["transfer"] = _run(transfer_name, runner(base, target=surrogate), eps=epsilon,
                                                        surrogate=surrogate_name, **common)
    # ART's Square on TensorFlow; on JAX (ART wraps TensorFlow models only) keras_wssi's compiled Square with
    # ART's default p_init = 0.3.
    square_available = backend.BACKEND != "tensorflow" or importlib.util.find_spec("art") is not None
    if norm == "linf" and square_available:
        count = len(images) if not square_examples else min(int(square_examples), len(images))
        if backend.BACKEND == "tensorflow":
            square = attacks_module.get_attack("square", max_iter=square_queries)
        else:
            square = attacks_module.get_attack("square_compiled", nb_iter=square_queries, p_init=0.3)
        square_common = dict(common, images=images[:count], labels=labels[:count])
        results["gradient_free"], correct["gradient_free"] = _run(
            attack_display_name(square.settings()), runner(square), eps=epsilon, **square_common)

    checks = []
    a_single, a_iter = results["single_step"]["accuracy"], results["iterative"]["accuracy"]
    checks.append(_check(
        "iterative_beats_single_step", a_iter <= a_single + tolerance,
        f"{results['iterative']['name']} leaves {a_iter:.3f} accuracy, {results['single_step']['name']} "
        f"{a_single:.3f}" + (": the iterative attack is not stronger; gradients may be masked or noisy."
                             if a_iter > a_single + tolerance else "."),
        iterative=a_iter, single_step=a_single))
    a_large = results["large_epsilon"]["accuracy"]
    checks.append(_check(
        "unbounded_epsilon", a_large <= unbounded_accuracy,
        f"{results['large_epsilon']['name']} ({norm}) leaves {a_large:.3f} accuracy"
        + (f", above {unbounded_accuracy:.2f}: the gradients do not lead the attack out of the class even when "
           "any image is reachable." if a_large > unbounded_accuracy else "."),
        accuracy=a_large, large_epsilon=large_epsilon))
    a_strong = results["strong"]["accuracy"]
    checks.append(_check(
        "more_steps_and_restarts", a_iter - a_strong <= tolerance,
        f"{results['strong']['name']} leaves {a_strong:.3f} against {a_iter:.3f} for {results['iterative']['name']}"
        + (": the base attack had not converged, so its numbers overstate robustness."
           if a_iter - a_strong > tolerance else "."),
        base=a_iter, strong=a_strong))
    if "gradient_free" in results:
        count = results["gradient_free"]["examples"]
        a_free = results["gradient_free"]["accuracy"]
        a_white = float(white_box[:count].mean())
        checks.append(_check(
            "gradient_free_not_stronger", a_free >= a_white - tolerance,
            f"{results['gradient_free']['name']} leaves {a_free:.3f}, the white-box worst case {a_white:.3f} on the "
            f"same {count} examples" + (": an attack without gradients does better than the gradient attacks, so "
                                        "the gradients mislead them (masking)." if a_free < a_white - tolerance
                                        else "."),
            gradient_free=a_free, white_box=a_white))
    else:
        reason = ("the Square attack in this runner is L∞ only" if norm != "linf" else
                  'Square needs the Adversarial Robustness Toolbox: pip install "keras_wssi[attacks]"')
        checks.append(_check("gradient_free_not_stronger", None, f"skipped: {reason}.", gradient_free=None,
                             white_box=None))
    if "transfer" in results:
        a_transfer, a_white = results["transfer"]["accuracy"], float(white_box.mean())
        checks.append(_check(
            "transfer_not_stronger", a_transfer >= a_white - tolerance,
            f"PGD transferred from {surrogate_name} leaves {a_transfer:.3f}, the white-box worst case {a_white:.3f}"
            + (": examples crafted on another model fool this one better than its own gradients do (masking)."
               if a_transfer < a_white - tolerance else "."),
            transfer=a_transfer, white_box=a_white))
    else:
        checks.append(_check("transfer_not_stronger", None, "skipped: no unregularized surrogate model given.",
                             transfer=None, white_box=None))
    failed = [c["check"] for c in checks if c["passed"] is False]
    result = {
        "passed": not failed,
        "failed": failed,
        "epsilon": float(epsilon),
        "norm": norm,
        "examples": int(len(images)),
        "clean_accuracy": float(clean.mean()),
        "white_box_accuracy": float(white_box.mean()),
        "white_box_attacks": [results[k]["name"] for k in white_box_keys],
        "tolerance": float(tolerance),
        "unbounded_accuracy": float(unbounded_accuracy),
        "seed": int(seed),
        "checks": checks,
        "attacks": list(results.values()),
    }
    result["summary"] = summary_sentence(result)
    return result


def summary_sentence(result, name="the model"):
    """One plain sentence: does `name` pass the gradient-masking checks, and if not, which fail.

    Example:

    ```python
    summary_sentence(gradient_masking_checks(model, x, y), "cure")
    # 'cure passes all 5 gradient-masking checks at ε=0.1 (linf).'
    ```
    """
    ran = [c for c in result["checks"] if c["passed"] is not None]
    skipped = [c["check"] for c in result["checks"] if c["passed"] is None]
    where = f"at ε={result['epsilon']:g} ({result['norm']})"
    if result["failed"]:
        reasons = " ".join(c["message"] for c in result["checks"] if c["passed"] is False)
        text = (f"{name} FAILS {len(result['failed'])} of {len(ran)} gradient-masking checks {where} "
                f"({', '.join(result['failed'])}): {reasons}")
    else:
        text = f"{name} passes all {len(ran)} gradient-masking checks {where}."
    if skipped:
        text += f" Skipped: {', '.join(skipped)}."
    return text
