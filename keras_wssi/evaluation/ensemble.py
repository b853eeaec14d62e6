"""The AutoAttack-style ensemble: robust accuracy as the worst case over APGD-CE, APGD-T, FAB-T and Square.

`autoattack(model, images, labels, epsilon)` runs keras_wssi's compiled attacks (`compiled_attacks`) one after
the other, as the reference AutoAttack does (Croce & Hein 2020): each attack only sees the examples that every
earlier attack failed on (`cascade=True`), and an example counts as robust only if all of them fail. With
`cascade=False` every attack runs on every clean-correct example, which gives each attack's own robust accuracy
(what the gradient-masking checks compare) at a higher cost.

Versions (L∞ and L2):

- `"standard"`: APGD-CE (100 iterations), APGD-T (targeted DLR, 100 iterations, the 9 most likely wrong classes),
  FAB-T (100 iterations, 9 targets), Square (5,000 queries).
- `"fast"`: APGD-CE (100), APGD-T (100, 3 targets), Square (1,000 queries).

Every attack of both versions is keras_wssi's own compiled code; ART's and cleverhans's attacks can be added by
name (`attacks=[...]`), and each attack's `implementation` field says which code produced its number.
"""

import json
import os
import time

import numpy as np

from keras_wssi.evaluation import attacks as attacks_module
from keras_wssi import backend
from keras_wssi.evaluation import compiled_attacks
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.evaluation.runner import AttackRunner
from keras_wssi.evaluation.runner import check_dataset

__all__ = ["AUTOATTACK_VERSIONS", "ATTACK_NAMES", "autoattack"]

# version: [(attack name (L∞), settings)]; the L2 names add "_l2".
AUTOATTACK_VERSIONS = {
    "standard": (
        ("apgd_ce", {"nb_iter": 100}),
        ("apgd_t", {"nb_iter": 100, "n_targets": 9}),
        ("fab_t", {"nb_iter": 100, "n_targets": 9}),
        ("square_compiled", {"nb_iter": 5000}),
    ),
    "fast": (
        ("apgd_ce", {"nb_iter": 100}),
        ("apgd_t", {"nb_iter": 100, "n_targets": 3}),
        ("square_compiled", {"nb_iter": 1000}),
    ),
}

# Human names for reports and plots.
ATTACK_NAMES = {
    "apgd_ce": "APGD-CE",
    "apgd_dlr": "APGD-DLR",
    "apgd_t": "APGD-T (targeted DLR)",
    "fab_t": "FAB-T",
    "square_compiled": "Square",
    "square": "Square (ART)",
    "square_l2": "Square (ART)",
    "pgd": "PGD (cleverhans)",
    "fgsm": "FGSM (cleverhans)",
}

_STATE_VERSION = 1


def _attack_list(version, norm, attacks, overrides):
    if attacks is None:
        if version not in AUTOATTACK_VERSIONS:
            raise EvaluationError(f"version must be one of {', '.join(AUTOATTACK_VERSIONS)}, got {version!r}.")
        attacks = []
        for name, settings in AUTOATTACK_VERSIONS[version]:
            settings = dict(settings)
            settings.update((overrides or {}).get(name, {}))
            if norm == "l2":
                name = name + "_l2"
            attacks.append((name, settings))
    else:
        attacks = [(a, dict((overrides or {}).get(_base_name(getattr(a, "name", a)), {}))) for a in attacks]
    built = []
    for name, settings in attacks:
        attack = attacks_module.get_attack(name, **settings)
        if attack.norm != norm:
            raise EvaluationError(f"Attack {attack.name!r} is {attack.norm}, but the ensemble's norm is {norm!r}.")
        if attack.minimal_perturbation:
            raise EvaluationError(f"Attack {attack.name!r} finds minimal perturbations; the ensemble takes ε-attacks.")
        built.append(attack)
    if not built:
        raise EvaluationError("attacks is empty: give at least one attack.")
    if len({a.name for a in built}) != len(built):
        raise EvaluationError(f"attacks has repeated names: {[a.name for a in built]}.")
    return built


def _base_name(name):
    return name[:-3] if name.endswith("_l2") else name



def _implementation(attack):
    if attack.library == "cleverhans":
        return f"{attacks_module.implementation(attack)} (run by keras_wssi.evaluation.AttackRunner)"
    return attacks_module.implementation(attack)


class _State:
    """Progress saved to an `.npz` after every chunk of every attack, so an interrupted run resumes."""

    def __init__(self, path, settings):
        self.path = path
        self.settings = json.dumps(settings, sort_keys=True)
        self.arrays = {}
        if path and os.path.exists(path):
            with np.load(path, allow_pickle=False) as saved:
                stored = str(saved["settings"])
                if stored != self.settings:
                    raise EvaluationError(
                        f"state_path {path!r} holds a run with other settings; delete it or use another path.\n"
                        f"saved: {stored}\nnow:   {self.settings}"
                    )
                self.arrays = {key: saved[key] for key in saved.files if key != "settings"}

    def get(self, key):
        return self.arrays.get(key)

    def put(self, **arrays):
        if not self.path:
            return
        self.arrays.update(arrays)
        temporary = self.path + ".tmp.npz"
        np.savez(temporary, settings=np.array(self.settings), **self.arrays)
        os.replace(temporary, self.path)


def autoattack(
    model,
    images,
    labels,
    epsilon,
    norm="linf",
    version="standard",
    seed=0,
    batch_size=500,
    attacks=None,
    budget=None,
    cascade=True,
    clip_min=0.0,
    clip_max=1.0,
    jit_compile=False,
    recover_logits=False,
    state_path=None,
    progress=False,
):
    """Robust accuracy under the AutoAttack-style ensemble (worst case over attacks, per example).

    Each attack is keras_wssi's own compiled implementation (`keras_wssi/evaluation/compiled_attacks.py`):
    APGD-CE, APGD-T on the targeted DLR loss, FAB-T and Square (L∞ and L2). Random numbers are keyed
    by `(seed, attack, restart or target, example index)`, so results do not depend on `batch_size`. With
    `state_path`, progress is saved after every chunk and a rerun with the same arguments resumes.

    Args:
        model: a Keras classifier outputting logits (see `logits_function`).
        images: float inputs `(N, …)` inside `[clip_min, clip_max]`.
        labels: int labels `(N,)`.
        epsilon: the radius of the threat model (> 0).
        norm: `"linf"` or `"l2"`.
        version: `"standard"` or `"fast"` (see `AUTOATTACK_VERSIONS`).
        seed: integer seed of every random start and Square proposal.
        batch_size: examples per compiled call (bounds memory).
        attacks: optional list of attack names / `Attack`s replacing the version's list (e.g.
            `["apgd_ce", "pgd"]` to set the cleverhans baseline beside APGD).
        budget: optional per-attack settings overriding the version's, e.g. `{"square_compiled": {"nb_iter": 1000},
            "apgd_t": {"n_targets": 3}}` (keys are the L∞ names; they apply to the L2 variants too).
        cascade: run each attack only on the examples the earlier ones failed on (as AutoAttack does); False runs
            every attack on every clean-correct example, so each attack's own accuracy is known.
        clip_min, clip_max: the box of valid inputs.
        jit_compile: XLA for the attack graphs (helps dense nets on CPU; slows convolutions there).
        recover_logits: accept a softmax output (announced in `settings["logits"]`).
        state_path: optional `.npz` file for saving and resuming progress.
        progress: print one line per attack.

    Returns:
        A dict: `clean_accuracy`, `robust_accuracy` (the ensemble), `threat_model` (`"Linf"`/`"L2"`), `epsilon`,
        `examples`, `version`, `attacks` (one dict per attack, in order: `name`, `human_name`, `implementation`,
        `settings`, `robust_accuracy` (its own when `cascade=False`, after it and every earlier attack when
        `cascade=True`), `robust_accuracy_cumulative`, `examples_attacked`, `newly_broken`, `forward_passes`,
        `seconds`), `per_attack_robust_accuracy` (`{name: accuracy}` as in `attacks`), `robust` (per-example
        bool NumPy array), `clean_correct` (bool array), `per_attack_robust` (`{name: bool array}`),
        `forward_passes` (total), `settings` and `seconds`.

    Example:

    ```python
    result = keras_wssi.evaluation.autoattack(model, x_test[:1000], y_test[:1000], epsilon=0.1)
    result["clean_accuracy"], result["robust_accuracy"], result["per_attack_robust_accuracy"]
    ```
    """
    started = time.perf_counter()
    if norm not in ("linf", "l2"):
        raise EvaluationError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    try:
        epsilon = float(epsilon)
    except (TypeError, ValueError):
        raise EvaluationError(f"epsilon must be a number, got {epsilon!r}.") from None
    if not np.isfinite(epsilon) or epsilon <= 0:
        raise EvaluationError(f"epsilon must be finite and > 0, got {epsilon!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if budget is not None and not isinstance(budget, dict):
        raise EvaluationError(f"budget must be a dict {{attack name: settings}}, got {budget!r}.")
    attack_list = _attack_list(version, norm, attacks, budget)
    images, labels = check_dataset(images, labels, model)

    runners = [AttackRunner(model, attack, batch_size=batch_size, seed=seed, clip_min=clip_min, clip_max=clip_max,
                            jit_compile=jit_compile, recover_logits=recover_logits, progress=False)
               for attack in attack_list]
    first = runners[0]
    images, labels = first._prepare(images, labels)
    for runner in runners[1:]:
        runner._logits_fn, runner.logits_note = first._logits_fn, first.logits_note
        runner._num_classes = first._num_classes
    clean_correct = first._predict_correct(images, labels)
    num_classes = int(np.asarray(first._logits_fn(images[:1])).shape[-1])

    settings = {
        "version": version if attacks is None else "custom",
        "norm": norm,
        "epsilon": epsilon,
        "seed": int(seed),
        "batch_size": batch_size,
        "cascade": bool(cascade),
        "clip_min": clip_min,
        "clip_max": clip_max,
        "jit_compile": bool(jit_compile),
        "backend": backend.BACKEND,
        "examples": len(images),
        "attacks": [runner.settings() for runner in runners],
    }
    if first.logits_note:
        settings["logits"] = first.logits_note
    state = _State(state_path, dict(settings, state_version=_STATE_VERSION,
                                    data=[float(images.sum()), int(labels.sum())]))

    robust = clean_correct.copy()
    per_attack, per_attack_robust, total_forwards = [], {}, 0
    for number, (attack, runner) in enumerate(zip(attack_list, runners)):
        attack_started = time.perf_counter()
        active = robust.copy() if cascade else clean_correct.copy()
        prefix = f"{number}_{attack.name}"
        saved_active = state.get(prefix + "/active")
        if saved_active is not None:
            active = saved_active.astype(bool)
        finished = state.get(prefix + "/finished")
        if finished is not None and bool(finished):
            survived = state.get(prefix + "/robust").astype(bool)
            forwards = state.get(prefix + "/forwards").astype(np.int64)
            seconds = float(state.get(prefix + "/seconds"))
        else:
            state.put(**{prefix + "/active": active})
            survived, forwards = _run_one(attack, runner, images, labels, epsilon, active, num_classes, batch_size,
                                          seed, state, prefix)
            seconds = time.perf_counter() - attack_started
            state.put(**{prefix + "/robust": survived, prefix + "/forwards": forwards,
                         prefix + "/seconds": np.array(seconds), prefix + "/finished": np.array(True)})
        survived = survived & active
        newly_broken = int((robust & ~survived & active).sum())
        robust = robust & (survived | ~active)
        per_attack_robust[attack.name] = survived if not cascade else robust.copy()
        forward_passes = int(forwards.sum())
        total_forwards += forward_passes
        entry = {
            "name": attack.name,
            "human_name": ATTACK_NAMES.get(_base_name(attack.name), attack.name),
            "implementation": _implementation(attack),
            "backend": backend.BACKEND,
            "settings": runner.settings(),
            "robust_accuracy": float(per_attack_robust[attack.name].mean()),
            "robust_accuracy_cumulative": float(robust.mean()),
            "examples_attacked": int(active.sum()),
            "newly_broken": newly_broken,
            "forward_passes": forward_passes,
            "seconds": seconds,
        }
        per_attack.append(entry)
        if progress:
            print(f"{entry['human_name']:>24}: robust accuracy {entry['robust_accuracy']:.4f} "
                  f"(ensemble so far {entry['robust_accuracy_cumulative']:.4f}), {entry['examples_attacked']} "
                  f"attacked, {forward_passes} forward passes, {seconds:.1f} s", flush=True)
    return {
        "threat_model": "Linf" if norm == "linf" else "L2",
        "epsilon": epsilon,
        "version": settings["version"],
        "examples": len(images),
        "clean_accuracy": float(clean_correct.mean()),
        "robust_accuracy": float(robust.mean()),
        "attacks": per_attack,
        "per_attack_robust_accuracy": {entry["name"]: entry["robust_accuracy"] for entry in per_attack},
        "robust": robust,
        "clean_correct": clean_correct,
        "per_attack_robust": per_attack_robust,
        "forward_passes": total_forwards,
        "settings": settings,
        "seconds": time.perf_counter() - started,
    }


def _run_one(attack, runner, images, labels, epsilon, active, num_classes, batch_size, seed, state, prefix):
    """`(robust, forwards)` of one attack on the `active` examples."""
    if attack.library == "keras_wssi":
        if runner._compiled is None:
            runner._compiled = compiled_attacks.attack_kernel(
                attack, runner._logits_fn, images.shape[1:], jit_compile=runner.jit_compile,
                clip_min=runner.clip_min, clip_max=runner.clip_max, variables=runner.model.variables,
            )
        runs = compiled_attacks.attack_runs(attack, seed, num_classes)
        resume = None
        if state.get(prefix + "/chunks") is not None:
            resume = (state.get(prefix + "/chunks"), state.get(prefix + "/partial_robust"),
                      state.get(prefix + "/partial_forwards"))
        chunks = [] if resume is None else [int(c) for c in resume[0]]

        def on_chunk(chunk, robust, forwards):
            chunks.append(chunk)
            state.put(**{prefix + "/chunks": np.array(chunks, np.int64), prefix + "/partial_robust": robust,
                         prefix + "/partial_forwards": forwards})

        _, robust, forwards = compiled_attacks.run_attack(runner._compiled, images, labels, epsilon, active, runs,
                                                          batch_size, on_chunk=on_chunk, resume=resume)
        return robust, forwards
    # cleverhans and ART attacks: through the runner, on the active examples only.
    positions = np.flatnonzero(active)
    robust = np.zeros(len(images), bool)
    forwards = np.zeros(len(images), np.int64)
    if not len(positions):
        return robust, forwards
    subset_images, subset_labels = images[positions], labels[positions]
    if attack.library == "art":
        _, correct = runner._art_attack(subset_images, subset_labels, epsilon)
        queries = dict(attack.options).get("max_iter", 0) * attack.restarts
    else:
        correct = []
        for start in range(0, len(positions), batch_size):
            stop = min(start + batch_size, len(positions))
            correct.append(runner._attack_batch(subset_images, subset_labels, start, stop, epsilon)[1])
        correct = np.concatenate(correct)
        queries = (attack.nb_iter + 1) * attack.restarts
    robust[positions] = correct
    forwards[positions] = queries
    return robust, forwards
