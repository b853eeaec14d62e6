"""Adversarial attacks behind one adapter: cleverhans's `tf2` attacks, plus CW-L2 and Square through ART.

Every gradient attack here is cleverhans 4.0.0's own function (`cleverhans.tf2.attacks`), called through
`Attack.perturb`, which always

- passes the true labels (`y=`), so cleverhans never falls back to the model's own predictions;
- feeds logits (see `logits_function`: a softmax output is refused, or recovered and announced);
- adapts a Keras loss to cleverhans's `loss_fn(labels=..., logits=...)` call;
- turns `sanity_checks` off (cleverhans evaluates them with `np.all` on tensors, which fails under
  NumPy >= 1.24 and inside `tf.function`) and validates the same conditions eagerly instead;
- passes the PGD step size as a `_StepSize`, so `ε` and the step can be tensors inside one traced graph
  (cleverhans checks `assert eps_iter <= eps` in Python; we check it before tracing);
- draws PGD's random start from a stateless generator keyed by `(seed, restart, example index)`, so
  results do not depend on batch size or on graph-versus-eager execution (`seeded_random_start`).

cleverhans 4.0.0's `carlini_wagner_l2` and `spsa` do not run on Keras 3 (Keras-2 optimizer API), so
`"cw_l2"` (Carlini & Wagner L2) and `"square"` / `"square_l2"` (Square attack, gradient-free) come from the
Adversarial Robustness Toolbox (`pip install "keras_wssi[attacks]"`), imported lazily.

On the JAX backend the cleverhans attacks run through `gradient_attacks` (cleverhans.jax where it computes the
attack as cleverhans.tf2 does, else keras_wssi's keras.ops transcription of cleverhans.tf2), and the ART attacks
are refused with the compiled replacement named; `Attack.settings()` records the `implementation` and `backend`.

The attacks of the AutoAttack-style ensemble are keras_wssi's own (`library == "keras_wssi"`, computed by
`keras_wssi/evaluation/compiled_attacks.py`): `"apgd_ce"`, `"apgd_dlr"`, `"apgd_t"`, `"fab_t"` (each also
`"…_l2"`) and `"square_compiled"` (and `"square_compiled_l2"`).
"""

import contextlib
import dataclasses
import math
import threading
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi import structure

__all__ = [
    "ATTACKS",
    "Attack",
    "EvaluationError",
    "get_attack",
    "logits_function",
    "seeded_random_start",
]


class EvaluationError(ValueError):
    """Raised when a model, data set or setting cannot be evaluated as asked."""



_TF2 = {
    "fgm": "cleverhans.tf2.attacks.fast_gradient_method",
    "pgd": "cleverhans.tf2.attacks.projected_gradient_descent",
    "bim": "cleverhans.tf2.attacks.basic_iterative_method",
    "mim": "cleverhans.tf2.attacks.momentum_iterative_method",
    "madry": "cleverhans.tf2.attacks.madry_et_al",
}
_JAX = {
    "fgm": "cleverhans.jax.attacks.fast_gradient_method",
    "pgd": "cleverhans.jax.attacks.projected_gradient_descent (its loop body in a fori_loop)",
    "bim": "cleverhans.jax.attacks.projected_gradient_descent (rand_init=False; its loop body in a fori_loop)",
    "madry": "cleverhans.jax.attacks.projected_gradient_descent (rand_init=True; its loop body in a fori_loop)",
}
_TRANSCRIPTION = "keras_wssi.evaluation.gradient_attacks.cleverhans_tf2_transcription"

# ART attack → keras_wssi's compiled replacement on JAX.
_ART_REPLACEMENTS = {
    "cw_l2": "'fab_t_l2' (minimal-L2 FAB-T) or 'apgd_ce_l2'",
    "square": "'square_compiled' (keras_wssi's compiled Square attack)",
}


def uses_cleverhans_jax(attack):
    """Whether `attack` runs cleverhans.jax's own function on JAX (L∞ FGM/PGD/BIM/Madry without a custom loss)."""
    return attack.method in _JAX and attack.norm == "linf" and attack.loss is None


def implementation(attack):
    """The code that computes `attack`'s adversarial examples on the active backend (what reports record)."""
    if attack.library == "keras_wssi":
        return "keras_wssi.evaluation.compiled_attacks"
    if attack.library == "art":
        return ("art.attacks.evasion.CarliniL2Method" if attack.method == "cw_l2"
                else "art.attacks.evasion.SquareAttack")
    if backend.BACKEND == "tensorflow":
        return _TF2[attack.method]
    if uses_cleverhans_jax(attack):
        return _JAX[attack.method]
    return f"{_TRANSCRIPTION} (of {_TF2[attack.method]})"


def check_backend(attack):
    """Raises a clear `EvaluationError` when `attack` has no implementation on the active backend."""
    if backend.BACKEND == "tensorflow" or attack.library != "art":
        return
    replacement = _ART_REPLACEMENTS[attack.method]
    if attack.method == "square" and attack.norm == "l2":
        replacement = "'square_compiled_l2' (keras_wssi's compiled Square attack)"
    raise EvaluationError(
        f"Attack {attack.name!r} ({implementation(attack)}) has no JAX implementation: the Adversarial Robustness "
        f"Toolbox wraps TensorFlow models only. On JAX use {replacement}, or run with KERAS_BACKEND=tensorflow."
    )


_NORMS = {"linf": np.inf, "l2": 2}


@dataclasses.dataclass(frozen=True)
class Attack:
    """One attack with its settings; `get_attack("pgd", nb_iter=40)` builds one.

    Attributes:
        name: the name it is reported under (`"pgd"`, `"fgsm"`, …).
        method: `"fgm"`, `"pgd"`, `"bim"`, `"mim"`, `"madry"` (cleverhans), `"cw_l2"` or `"square"` (ART),
            `"apgd_ce"`, `"apgd_dlr"`, `"apgd_t"`, `"fab_t"`, `"square_compiled"` (keras_wssi's own).
        norm: `"linf"` or `"l2"`: the ball `ε` measures.
        nb_iter: iterations of the iterative attacks.
        step_size: step per iteration as a multiple of `ε` (`eps_iter = step_size * ε`); None uses
            `2.5 / nb_iter` (Madry et al.), capped at 1.
        rand_init: start from a uniform random point of the ε-ball (PGD); Madry always does, BIM never.
        restarts: independent random starts; an example is robust only if it survives all of them.
        decay_factor: momentum decay of MIM.
        loss: None (cleverhans's sparse softmax cross-entropy on logits) or a Keras loss (name or object)
            applied to `(labels, logits)`; only FGM and PGD accept a loss in cleverhans.
        options: extra keyword arguments for the ART attacks (e.g. `{"max_iter": 100}`).
    """

    name: str
    method: str
    norm: str = "linf"
    nb_iter: int = 1
    step_size: float = None
    rand_init: bool = False
    restarts: int = 1
    decay_factor: float = 1.0
    loss: object = None
    options: tuple = ()

    @property
    def library(self):
        """Which code computes the adversarial examples: `"cleverhans"`, `"art"` or `"keras_wssi"`."""
        if self.method in _OWN_METHODS:
            return "keras_wssi"
        return "art" if self.method in ("cw_l2", "square") else "cleverhans"

    @property
    def minimal_perturbation(self):
        """True for attacks that find the smallest perturbation once (CW-L2) instead of one run per ε."""
        return self.method == "cw_l2"

    @property
    def randomized(self):
        return self.rand_init or self.method in ("madry", "square", "apgd_ce", "apgd_dlr", "square_compiled")

    @property
    def ord(self):
        return _NORMS[self.norm]

    def eps_iter_ratio(self):
        """`eps_iter / ε` for the iterative cleverhans attacks."""
        if self.step_size is not None:
            return float(self.step_size)
        return min(1.0, 2.5 / max(1, self.nb_iter))

    def settings(self):
        """The settings as JSON-ready values (what the report records)."""
        settings = {
            "name": self.name,
            "method": self.method,
            "library": self.library,
            "norm": self.norm,
            "implementation": implementation(self),
            "backend": backend.BACKEND,
        }
        if self.library == "cleverhans":
            settings["function"] = implementation(self)
            settings["nb_iter"] = self.nb_iter
            if self.method != "fgm":
                settings["eps_iter_over_eps"] = self.eps_iter_ratio()
            settings["rand_init"] = self.method == "madry" or (self.method == "pgd" and self.rand_init)
            settings["restarts"] = self.restarts
            if self.method == "mim":
                settings["decay_factor"] = self.decay_factor
            settings["loss"] = _loss_name(self.loss)
        elif self.library == "keras_wssi":
            settings["function"] = _OWN_METHODS[self.method]
            settings["nb_iter"] = self.nb_iter
            settings["restarts"] = self.restarts
            settings.update({key: value for key, value in self.options})
        else:
            settings["class"] = {"cw_l2": "art.attacks.evasion.CarliniL2Method",
                                 "square": "art.attacks.evasion.SquareAttack"}[self.method]
            settings["restarts"] = self.restarts
            settings.update({key: value for key, value in self.options})
        return settings

    def cleverhans_kwargs(self, eps, clip_min, clip_max):
        """The keyword arguments cleverhans's function gets (except `model_fn`, `x` and `y`)."""
        if self.library != "cleverhans":
            raise EvaluationError(f"Attack {self.name!r} is not a cleverhans attack.")
        kwargs = {"eps": eps, "norm": self.ord, "clip_min": clip_min, "clip_max": clip_max, "sanity_checks": False}
        if self.method != "fgm":
            kwargs["eps_iter"] = _StepSize(eps * self.eps_iter_ratio())
            kwargs["nb_iter"] = int(self.nb_iter)
        if self.method == "pgd":
            kwargs["rand_init"] = bool(self.rand_init)
        if self.method in ("fgm", "pgd"):
            kwargs["loss_fn"] = _adapt_loss(self.loss)
        if self.method == "mim":
            kwargs["decay_factor"] = float(self.decay_factor)
        if self.method == "madry":
            # cleverhans defaults rand_minmax to 0.3 whatever ε is; the random start belongs to the ε-ball.
            kwargs["rand_minmax"] = eps
        return kwargs

    def cleverhans_function(self):
        """cleverhans's own attack function for this method."""
        from cleverhans.tf2.attacks.basic_iterative_method import basic_iterative_method
        from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
        from cleverhans.tf2.attacks.madry_et_al import madry_et_al
        from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method
        from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

        return {
            "fgm": fast_gradient_method,
            "pgd": projected_gradient_descent,
            "bim": basic_iterative_method,
            "mim": momentum_iterative_method,
            "madry": madry_et_al,
        }[self.method]


_CLEVERHANS_FUNCTIONS = {
    "fgm": "cleverhans.tf2.attacks.fast_gradient_method",
    "pgd": "cleverhans.tf2.attacks.projected_gradient_descent",
    "bim": "cleverhans.tf2.attacks.basic_iterative_method",
    "mim": "cleverhans.tf2.attacks.momentum_iterative_method",
    "madry": "cleverhans.tf2.attacks.madry_et_al",
}

# name: (method, norm, defaults)
ATTACKS = {
    "fgsm": ("fgm", "linf", {}),
    "fgm_l2": ("fgm", "l2", {}),
    "pgd": ("pgd", "linf", {"nb_iter": 40, "rand_init": True}),
    "pgd_l2": ("pgd", "l2", {"nb_iter": 40, "rand_init": True}),
    "bim": ("bim", "linf", {"nb_iter": 10}),
    "mim": ("mim", "linf", {"nb_iter": 10}),
    "madry": ("madry", "linf", {"nb_iter": 40}),
    "cw_l2": ("cw_l2", "l2", {}),
    "square": ("square", "linf", {}),
    "square_l2": ("square", "l2", {}),
    # keras_wssi's own compiled attacks (keras_wssi/evaluation/compiled_attacks.py), the AutoAttack ensemble's parts.
    "apgd_ce": ("apgd_ce", "linf", {"nb_iter": 100}),
    "apgd_ce_l2": ("apgd_ce", "l2", {"nb_iter": 100}),
    "apgd_dlr": ("apgd_dlr", "linf", {"nb_iter": 100}),
    "apgd_dlr_l2": ("apgd_dlr", "l2", {"nb_iter": 100}),
    "apgd_t": ("apgd_t", "linf", {"nb_iter": 100}),
    "apgd_t_l2": ("apgd_t", "l2", {"nb_iter": 100}),
    "fab_t": ("fab_t", "linf", {"nb_iter": 100}),
    "fab_t_l2": ("fab_t", "l2", {"nb_iter": 100}),
    "square_compiled": ("square_compiled", "linf", {"nb_iter": 5000}),
    "square_compiled_l2": ("square_compiled", "l2", {"nb_iter": 5000}),
}

# method: the function that computes it.
_OWN_METHODS = {
    "apgd_ce": "keras_wssi.evaluation.compiled_attacks.apgd_batch(loss='ce')",
    "apgd_dlr": "keras_wssi.evaluation.compiled_attacks.apgd_batch(loss='dlr')",
    "apgd_t": "keras_wssi.evaluation.compiled_attacks.apgd_batch(loss='dlr_targeted')",
    "fab_t": "keras_wssi.evaluation.compiled_attacks.fab_batch",
    "square_compiled": "keras_wssi.evaluation.compiled_attacks.square_batch",
}

# Settings of the own attacks that are not `Attack` fields (AutoAttack's standard values).
_OWN_DEFAULTS = {
    "apgd_ce": {"rho": 0.75},
    "apgd_dlr": {"rho": 0.75},
    "apgd_t": {"rho": 0.75, "n_targets": 9},
    "fab_t": {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "n_targets": 9},
    "square_compiled": {"p_init": 0.8},
}

_ART_DEFAULTS = {
    "cw_l2": {"max_iter": 50, "binary_search_steps": 5, "learning_rate": 0.05, "initial_const": 1.0},
    "square": {"max_iter": 300, "p_init": 0.3},
}


def get_attack(name, **settings):
    """Builds an `Attack` by name, with its defaults overridden by `settings`.

    Args:
        name: one of `ATTACKS`: `"fgsm"`, `"fgm_l2"`, `"pgd"`, `"pgd_l2"`, `"bim"`, `"mim"`, `"madry"`
            (cleverhans), `"cw_l2"`, `"square"`, `"square_l2"` (ART, optional extra), or keras_wssi's own
            `"apgd_ce"`, `"apgd_dlr"`, `"apgd_t"`, `"fab_t"`, `"square_compiled"` (and each `"…_l2"`). An `Attack` is
            returned as is.
        **settings: `Attack` fields (`nb_iter`, `step_size`, `rand_init`, `restarts`, `decay_factor`,
            `loss`); unknown fields go to the ART attack's constructor for `"cw_l2"` and `"square"`; the own
            attacks take `rho` (APGD), `n_targets` (APGD-T, FAB-T), `alpha_max`, `eta`, `beta` (FAB-T), `p_init`
            (Square).

    Returns:
        An `Attack`.

    Example:

    ```python
    attack = get_attack("pgd", nb_iter=40, restarts=5)
    ```
    """
    if isinstance(name, Attack):
        return dataclasses.replace(name, **settings) if settings else name
    if not isinstance(name, str) or name not in ATTACKS:
        raise EvaluationError(f"Unknown attack {name!r}: expected one of {', '.join(ATTACKS)}.")
    method, norm, defaults = ATTACKS[name]
    fields = {f.name for f in dataclasses.fields(Attack)}
    values = dict(defaults)
    options = dict(_ART_DEFAULTS.get(method, _OWN_DEFAULTS.get(method, {})))
    for key, value in settings.items():
        if key in fields and key not in ("name", "method", "norm", "options"):
            values[key] = value
        elif method in _ART_DEFAULTS:
            options[key] = value
        elif method in _OWN_DEFAULTS:
            if key not in _OWN_DEFAULTS[method]:
                raise EvaluationError(
                    f"Attack {name!r} has no setting {key!r}: expected nb_iter, restarts or one of "
                    f"{', '.join(_OWN_DEFAULTS[method])}."
                )
            options[key] = value
        else:
            raise EvaluationError(
                f"Attack {name!r} has no setting {key!r}: expected one of nb_iter, step_size, rand_init, "
                "restarts, decay_factor, loss."
            )
    attack = Attack(name=name, method=method, norm=norm, options=tuple(sorted(options.items())), **values)
    _validate(attack)
    return attack


def _validate(attack):
    if not isinstance(attack.nb_iter, int) or attack.nb_iter < 1:
        raise EvaluationError(f"nb_iter of attack {attack.name!r} must be a positive integer, got {attack.nb_iter!r}.")
    if not isinstance(attack.restarts, int) or attack.restarts < 1:
        raise EvaluationError(
            f"restarts of attack {attack.name!r} must be a positive integer, got {attack.restarts!r}."
        )
    if attack.step_size is not None and not (0 < attack.step_size <= 1):
        raise EvaluationError(
            f"step_size of attack {attack.name!r} is eps_iter / eps and must be in (0, 1] (cleverhans requires "
            f"eps_iter <= eps), got {attack.step_size!r}."
        )
    options = dict(attack.options)
    if "n_targets" in options and (not isinstance(options["n_targets"], int) or options["n_targets"] < 1):
        raise EvaluationError(
            f"n_targets of attack {attack.name!r} must be a positive integer, got {options['n_targets']!r}."
        )
    if attack.restarts > 1 and attack.method in ("apgd_t", "fab_t"):
        raise EvaluationError(
            f"Attack {attack.name!r} runs once per target class (n_targets), from a fixed start: use n_targets, not "
            f"restarts={attack.restarts}."
        )
    if attack.loss is not None and attack.method not in ("fgm", "pgd"):
        raise EvaluationError(
            f"Attack {attack.name!r} ({_CLEVERHANS_FUNCTIONS.get(attack.method, attack.method)}) takes no loss "
            "argument in cleverhans; pass loss only to fgsm, fgm_l2, pgd or pgd_l2."
        )
    if attack.restarts > 1 and not attack.randomized:
        raise EvaluationError(
            f"restarts={attack.restarts} for attack {attack.name!r}, which is deterministic: restarts need a "
            "random start (rand_init=True for PGD, or madry)."
        )


def _loss_name(loss):
    if loss is None:
        if backend.BACKEND == "tensorflow":
            return "tf.nn.sparse_softmax_cross_entropy_with_logits"
        return "softmax cross-entropy on logits"
    if isinstance(loss, str):
        return loss
    return type(loss).__name__


def _adapt_loss(loss):
    """A Keras loss as cleverhans calls it: `loss_fn(labels=..., logits=...)`, on logits."""
    if loss is None:
        return None
    loss_object = keras.losses.get(loss)
    if isinstance(loss_object, keras.losses.Loss):
        config = loss_object.get_config()
        if "from_logits" in config and not config["from_logits"]:
            raise EvaluationError(
                f"loss={loss!r} expects probabilities (from_logits=False), but attacks feed logits: use "
                f"{type(loss_object).__name__}(from_logits=True)."
            )
    elif isinstance(loss, str):
        # keras.losses.get("sparse_categorical_crossentropy") is the function with from_logits=False.
        function = loss_object

        def loss_object(labels, logits):
            return function(labels, logits, from_logits=True)

    def loss_fn(labels, logits):
        return loss_object(labels, logits)

    return loss_fn


class _StepSize:
    """A PGD/BIM/MIM step size that is a tensor inside the graph.

    cleverhans checks `assert eps_iter <= eps` with a Python `assert`, which cannot take a symbolic
    tensor; the runner validates `eps_iter <= eps` eagerly (it is `step_size <= 1`) and this wrapper answers
    the comparison, then converts to the tensor everywhere else.
    """

    def __init__(self, value):
        self.value = value

    def __le__(self, other):
        return True

    def __tf_tensor__(self, dtype=None, name=None):
        import tensorflow as tf

        return tf.convert_to_tensor(self.value, dtype=dtype, name=name)


# ---------------------------------------------------------------------------------------------------------
# Seeded random starts.

_RANDOM_START = threading.local()


def _stateless_random_lp_vector(shape, ord, eps, dtype="float32", seed=None):
    """cleverhans's `random_lp_vector` distribution, drawn per example from a stateless generator.

    Uniform on `[-ε, ε]^d` for L∞; for L2 the Calafiore et al. (1998) sampler cleverhans uses (a Gaussian
    direction scaled by `w^(1/d)`, `w ~ U[0, 1]`). Example `i` of the batch uses the key
    `fold_in(fold_in(seed, restart), index_i)`. TensorFlow only (cleverhans.tf2).
    """
    import tensorflow as tf

    state = getattr(_RANDOM_START, "state", None)
    if state is None:
        raise EvaluationError("The seeded random start was used outside seeded_random_start().")
    base_seed, indices = state
    del seed
    example_shape = shape[1:]
    dim = tf.reduce_prod(example_shape)

    def draw(index):
        key = tf.random.experimental.stateless_fold_in(base_seed, index)
        if ord == np.inf:
            return tf.random.stateless_uniform(example_shape, key, -1.0, 1.0, dtype=dtype)
        direction = tf.random.stateless_normal([dim], key, dtype=dtype)
        direction = direction / tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(direction)), 1e-24))
        w = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(key, 1), dtype=dtype)
        radius = tf.pow(w, 1.0 / tf.cast(dim, dtype))
        return tf.reshape(radius * direction, example_shape)

    if ord not in (np.inf, 2):
        raise EvaluationError(f"Random starts support the L∞ and L2 balls, got ord={ord!r}.")
    unit = tf.map_fn(draw, tf.cast(indices, tf.int32), fn_output_signature=tf.TensorSpec(None, dtype))
    return tf.cast(eps, dtype) * unit


@contextlib.contextmanager
def seeded_random_start(seed, restart, indices):
    """Makes cleverhans's PGD draw its random start from `(seed, restart, example indices)`.

    cleverhans's `projected_gradient_descent` draws the start with unseeded stateful ops, which differ
    between eager and graph execution. Inside this context (while tracing or running eagerly) its module's
    `random_lp_vector` is replaced by a stateless sampler of the same distribution, so a given example
    gets the same start whatever the batch size, padding or execution mode.

    Args:
        seed: integer seed.
        restart: integer (or scalar tensor) restart number.
        indices: int tensor `(batch,)`: the examples' positions in the data set.

    Example:

    ```python
    with seeded_random_start(0, 0, tf.range(128)):
        x_adv = projected_gradient_descent(model, x, 0.1, 0.01, 40, np.inf, y=y, rand_init=True)
    ```
    """
    import tensorflow as tf
    from cleverhans.tf2.attacks import projected_gradient_descent as pgd_module

    base = tf.random.experimental.stateless_fold_in(
        tf.constant([int(seed) & 0x7FFFFFFF, 0x5EED], tf.int64), tf.cast(restart, tf.int32)
    )
    previous_state = getattr(_RANDOM_START, "state", None)
    previous_sampler = pgd_module.random_lp_vector
    _RANDOM_START.state = (base, indices)
    pgd_module.random_lp_vector = _stateless_random_lp_vector
    try:
        yield
    finally:
        pgd_module.random_lp_vector = previous_sampler
        _RANDOM_START.state = previous_state


# ---------------------------------------------------------------------------------------------------------
# Logits.


def _looks_like_probabilities(outputs):
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return False
    return bool(np.all(outputs >= 0) and np.all(outputs <= 1) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-4))


def logits_function(model, sample=None, recover_logits=False):
    """A callable `x -> logits` for `model`, refusing (or recovering from) a probability output.

    Attacks and the cross-entropy they maximise are defined on logits; feeding probabilities flattens the
    gradients (a classic source of falsely high robustness). A model whose last layer is a softmax, or
    whose outputs on `sample` are non-negative rows summing to one, is refused unless
    `recover_logits=True`. Recovery is exact when the softmax sits on a Dense layer or a `Softmax`/
    `Activation` layer (the pre-activation is read off the graph); otherwise `log(p)` is used, which has
    the same softmax but saturated gradients. Recovery is announced with a warning.

    Args:
        model: a Keras model mapping a batch of inputs to one score per class.
        sample: a few inputs for the numerical probability check (optional).
        recover_logits: recover logits instead of raising.

    Returns:
        `(logits_fn, note)`: the callable and a string describing what was done ("" for logit models).

    Example:

    ```python
    logits_fn, note = logits_function(model, images[:16])
    ```
    """
    if not callable(model):
        raise EvaluationError(f"model must be a callable Keras model, got {type(model).__name__}.")
    activation = None
    try:
        activation = structure.output_activation(model)
    except Exception:  # Subclassed models have no graph to read; the numerical check below still runs.
        activation = None
    probabilities = activation == "softmax"
    if not probabilities and sample is not None and len(sample):
        probabilities = _looks_like_probabilities(model(sample[:64], training=False))
    if not probabilities:
        return _model_logits(model), ""
    if not recover_logits:
        raise EvaluationError(
            f"Model {model.name!r} outputs probabilities (softmax), but attacks need logits: cleverhans's loss is "
            "softmax cross-entropy on logits, and gradients through a saturated softmax vanish. Pass a model whose "
            "last layer is linear, or set recover_logits=True (flag --recover_logits) to recover them."
        )
    recovered = _pre_softmax_function(model)
    if recovered is not None:
        note = f"logits recovered exactly from the pre-softmax tensor of layer {model.layers[-1].name!r}"
    else:
        note = "logits recovered as log(probabilities): gradients may be masked by softmax saturation"

        def recovered(x):
            return ops.log(ops.maximum(ops.cast(model(x, training=False), "float32"), 1e-30))

    warnings.warn(f"Model {model.name!r} outputs probabilities; {note}.", stacklevel=2)
    return recovered, note


_LOGITS = weakref.WeakKeyDictionary()


def _model_logits(model):
    """`x -> model(x, training=False)`, one function per model (compiled attacks are kept with it, so every runner
    of the model reuses them); it holds the model weakly."""
    try:
        return _LOGITS[model]
    except (KeyError, TypeError):
        pass
    reference = weakref.ref(model)

    def logits(x):
        return reference()(x, training=False)

    try:
        _LOGITS[model] = logits
    except TypeError:
        pass
    return logits


def _pre_softmax_function(model):
    layers = getattr(model, "layers", None)
    if not layers or not hasattr(model, "inputs") or not model.inputs:
        return None
    last = layers[-1]
    try:
        penultimate = keras.Model(model.inputs, last.input)
    except Exception:  # Not a functional graph we can cut.
        return None
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return lambda x: penultimate(x, training=False)
    if isinstance(last, keras.layers.Dense):
        kernel, bias = last.kernel, last.bias

        def logits(x):
            z = ops.matmul(penultimate(x, training=False), kernel)
            return z + bias if bias is not None else z

        return logits
    return None


def check_epsilons(epsilons, name="epsilons"):
    """Validates a list of perturbation sizes: finite, ≥ 0, not empty."""
    if isinstance(epsilons, (int, float)):
        epsilons = [epsilons]
    try:
        values = [float(e) for e in epsilons]
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be a list of numbers, got {epsilons!r}.") from None
    if not values:
        raise EvaluationError(f"{name} is empty: give at least one perturbation size.")
    for value in values:
        if not math.isfinite(value) or value < 0:
            raise EvaluationError(f"{name} must be finite and >= 0, got {value!r} in {values}.")
    return values
