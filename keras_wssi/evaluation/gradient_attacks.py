"""The cleverhans gradient attacks (FGM, PGD, BIM, MIM, Madry) on the JAX backend.

On TensorFlow the runner calls cleverhans's own `cleverhans.tf2.attacks` functions. On JAX:

- L∞ FGSM, PGD, BIM and Madry without a custom loss run cleverhans's own JAX functions
  (`cleverhans.jax.attacks.fast_gradient_method` / `projected_gradient_descent`); PGD's Python loop over its body
  is run as an `ops.fori_loop` over the same body (the same arithmetic; XLA then compiles one iteration, not
  `nb_iter` unrolled copies, which took seconds per attack on CPU). cleverhans 4.0.0's JAX package
  predates today's JAX in three places, which `_cleverhans_jax` bridges without changing its arithmetic: it imports
  `jax.experimental.stax` (now `jax.example_libraries.stax`), calls `jnp.clip(a_min=, a_max=)` (now `min=`,
  `max=`), and draws PGD's random start with `jnp.random.uniform`, which never existed (the start is drawn here
  instead, keyed by `(seed, restart, example index)` like every other random start of keras_wssi).
- FGM-L2 and PGD-L2 (cleverhans 4.0.0's JAX FGM takes a unit L2 step whatever ε is: its L2 branch never multiplies
  by ε), MIM (not in cleverhans.jax) and any attack with a custom `loss` (cleverhans.jax takes no loss) run
  `cleverhans_tf2_transcription`: cleverhans.tf2's algorithms transcribed line by line into `keras.ops`.

`keras_wssi.evaluation.attacks.implementation(attack)` names the code that computes an attack on the active backend;
the runner and the reports record it. ART's attacks (`"cw_l2"`, `"square"`, `"square_l2"`) wrap TensorFlow models
only: on JAX, `attacks.check_backend` refuses them and names keras_wssi's compiled replacements.
"""

import importlib
import sys
import threading

import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi.evaluation import compiled_attacks
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.evaluation.attacks import uses_cleverhans_jax

__all__ = ["cleverhans_tf2_transcription", "run_batch"]

# ---------------------------------------------------------------------------------------------------------
# cleverhans.tf2 in keras.ops.


def _axes(x):
    return tuple(range(1, len(x.shape)))


def _optimize_linear(grad, eps, norm):
    if norm == np.inf:
        optimal = ops.stop_gradient(ops.sign(grad))
    else:
        optimal = grad / ops.sqrt(ops.maximum(1e-12, ops.sum(ops.square(grad), axis=_axes(grad), keepdims=True)))
    return eps * optimal


def _clip_eta(eta, norm, eps):
    if norm == np.inf:
        return ops.clip(eta, -eps, eps)
    length = ops.sqrt(ops.maximum(1e-12, ops.sum(ops.square(eta), axis=_axes(eta), keepdims=True)))
    return eta * ops.minimum(1.0, eps / length)


def _box(x, clip_min, clip_max):
    return x if clip_min is None else ops.clip(x, clip_min, clip_max)


def _gradient(model_fn, loss_fn, x, y):
    (grad,) = backend.grad(lambda point: loss_fn(labels=y, logits=model_fn(point)), x)
    return grad


def _default_loss(labels, logits):
    return ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _unit_ball_draw(x, indices, key, counter, norm):
    """A per-example point of the unit ball: uniform on `[-1, 1]^d` (L∞), or cleverhans's L2 sampler (a Gaussian
    direction scaled by `w^(1/d)`), from the counter hash of `(key, example index, counter)`."""
    size = int(np.prod(x.shape[1:]))
    if norm == np.inf:
        t = 2.0 * compiled_attacks._uniform(key, indices, 3 * counter, size) - 1.0
    else:
        u1 = compiled_attacks._uniform(key, indices, 3 * counter, size)
        u2 = compiled_attacks._uniform(key, indices, 3 * counter + 1, size)
        w = compiled_attacks._uniform(key, indices, 3 * counter + 2, 1)
        direction = ops.sqrt(-2.0 * ops.log(u1)) * ops.cos(2.0 * np.pi * u2)
        direction = direction / ops.sqrt(ops.maximum(ops.sum(ops.square(direction), axis=1, keepdims=True), 1e-24))
        t = direction * ops.power(w, 1.0 / size)
    return ops.reshape(t, (-1,) + tuple(x.shape[1:]))


def cleverhans_tf2_transcription(method, model_fn, x, y, eps, norm, indices, key, restart, nb_iter=1,
                                 eps_iter=None, loss_fn=None, rand_init=False, decay_factor=1.0, clip_min=None,
                                 clip_max=None):
    """cleverhans.tf2's `fast_gradient_method`, `projected_gradient_descent` (also BIM and Madry) and
    `momentum_iterative_method`, transcribed into `keras.ops` (true labels given, no sanity checks).

    Args:
        method: `"fgm"`, `"pgd"`, `"bim"`, `"madry"` or `"mim"`.
        model_fn: `x -> logits`.
        x, y: the batch and its int labels.
        eps, eps_iter: the ball's radius and the step (scalars, may be tensors).
        norm: `np.inf` or `2`.
        indices, key, restart: the example indices, the integer key and the restart number the random start
            (PGD with `rand_init`, Madry) is drawn from.
        nb_iter: iterations.
        loss_fn: `loss_fn(labels=, logits=)` (default: softmax cross-entropy per example).
        rand_init: random start in the ε-ball (PGD); Madry always starts randomly, BIM and MIM never.
        decay_factor: MIM's momentum decay.
        clip_min, clip_max: the box (None: none).

    Returns:
        The adversarial batch.
    """
    loss_fn = loss_fn or _default_loss
    x = ops.cast(x, "float32")

    def fgm(point, size):
        grad = _gradient(model_fn, loss_fn, point, y)
        return _box(point + _optimize_linear(grad, size, norm), clip_min, clip_max)

    if method == "fgm":
        return fgm(x, eps)
    if method == "mim":
        def mim_step(_, state):
            adv_x, momentum = state
            grad = _gradient(model_fn, loss_fn, adv_x, y)
            grad = grad / ops.maximum(1e-12, ops.mean(ops.abs(grad), axis=_axes(grad), keepdims=True))
            momentum = decay_factor * momentum + grad
            adv_x = adv_x + _optimize_linear(momentum, eps_iter, norm)
            adv_x = _box(x + _clip_eta(adv_x - x, norm, eps), clip_min, clip_max)
            return adv_x, momentum

        return ops.fori_loop(0, nb_iter, mim_step, (x, ops.zeros_like(x)))[0]
    if method == "madry" or (method == "pgd" and rand_init):
        eta = eps * _unit_ball_draw(x, indices, key, restart, norm)
    else:
        eta = ops.zeros_like(x)
    adv_x = _box(x + _clip_eta(eta, norm, eps), clip_min, clip_max)

    def pgd_step(_, adv_x):
        adv_x = fgm(adv_x, eps_iter)
        return _box(x + _clip_eta(adv_x - x, norm, eps), clip_min, clip_max)

    return ops.fori_loop(0, nb_iter, pgd_step, adv_x)


# ---------------------------------------------------------------------------------------------------------
# cleverhans.jax, bridged to today's JAX.

_RANDOM_START = threading.local()


class _JaxNumpyCompat:
    """`jax.numpy` as cleverhans 4.0.0's JAX code expects it: `clip(a_min=, a_max=)` and a seeded
    `random.uniform(shape, minval, maxval)` (drawn from the state set by `_seeded_start`)."""

    def __init__(self, jnp):
        self._jnp = jnp
        self.random = self

    def __getattr__(self, name):
        return getattr(self._jnp, name)

    def clip(self, a, a_min=None, a_max=None):
        return self._jnp.clip(a, a_min, a_max)

    def uniform(self, shape, minval, maxval):
        state = getattr(_RANDOM_START, "state", None)
        if state is None:
            raise EvaluationError("cleverhans.jax's random start was drawn outside keras_wssi's seeded runner.")
        x, indices, key, restart = state
        del shape
        return minval + (maxval - minval) * (_unit_ball_draw(x, indices, key, restart, np.inf) + 1.0) / 2.0


_CLEVERHANS_JAX = {}


def _cleverhans_jax():
    """cleverhans.jax's attack modules (imported once, with the compatibility bridge installed)."""
    if not _CLEVERHANS_JAX:
        import jax.example_libraries.stax
        import jax.numpy as jnp

        sys.modules.setdefault("jax.experimental.stax", jax.example_libraries.stax)
        compat = _JaxNumpyCompat(jnp)
        for name in ("utils", "attacks.fast_gradient_method", "attacks.projected_gradient_descent"):
            module = importlib.import_module(f"cleverhans.jax.{name}")
            module.np = compat
            _CLEVERHANS_JAX[name.rsplit(".", 1)[-1]] = module
    return _CLEVERHANS_JAX


class _StepSize:
    """PGD's step as a traced value: answers cleverhans's Python `assert eps_iter <= eps` (validated before
    tracing: it is `step_size <= 1`) and is an array everywhere else."""

    def __init__(self, value):
        self.value = value

    def __le__(self, other):
        return True

    def __jax_array__(self):
        return self.value


def _cleverhans_jax_batch(attack, model_fn, x, y, eps, indices, key, restart, clip_min, clip_max, num_classes):
    modules = _cleverhans_jax()
    labels = ops.one_hot(y, num_classes)
    if attack.method == "fgm":
        return modules["fast_gradient_method"].fast_gradient_method(
            model_fn, x, eps, np.inf, clip_min=clip_min, clip_max=clip_max, y=labels)
    rand_init = attack.method == "madry" or (attack.method == "pgd" and attack.rand_init)
    previous = getattr(_RANDOM_START, "state", None)
    _RANDOM_START.state = (x, indices, key, restart)
    pgd = modules["projected_gradient_descent"].projected_gradient_descent
    step = _StepSize(eps * attack.eps_iter_ratio())
    try:
        # cleverhans.jax's PGD is its start (nb_iter=0) then nb_iter times its own body: a PGD of one iteration
        # from the current point, with the ball around the original x. The body runs in a fori_loop (XLA compiles
        # one step instead of nb_iter unrolled copies); `_ball_around` keeps clip_eta centred on x.
        adv_x = pgd(model_fn, x, eps, step, 0, np.inf, clip_min=clip_min, clip_max=clip_max, y=labels,
                    rand_init=rand_init)
    finally:
        _RANDOM_START.state = previous
    fgm = modules["fast_gradient_method"].fast_gradient_method
    clip_eta = modules["utils"].clip_eta
    compat = modules["projected_gradient_descent"].np

    def body(_, adv_x):
        # The lines of cleverhans.jax's loop body (projected_gradient_descent.py), verbatim.
        adv_x = fgm(model_fn, adv_x, step, np.inf, clip_min=clip_min, clip_max=clip_max, y=labels, targeted=False)
        eta = adv_x - x
        eta = clip_eta(eta, np.inf, eps)
        adv_x = x + eta
        if clip_min is not None or clip_max is not None:
            adv_x = compat.clip(adv_x, a_min=clip_min, a_max=clip_max)
        return adv_x

    return ops.fori_loop(0, int(attack.nb_iter), body, adv_x)


def run_batch(attack, model_fn, x, y, indices, eps, key, restart, clip_min, clip_max, num_classes, loss_fn=None):
    """One batch of a cleverhans attack on JAX (inside a compiled function): cleverhans.jax where it computes the
    attack as cleverhans.tf2 does, the keras.ops transcription otherwise (see the module docstring)."""
    if uses_cleverhans_jax(attack):
        return _cleverhans_jax_batch(attack, model_fn, x, y, eps, indices, key, restart, clip_min, clip_max,
                                     num_classes)
    return cleverhans_tf2_transcription(
        attack.method, model_fn, x, y, eps, attack.ord, indices, key, restart, nb_iter=int(attack.nb_iter),
        eps_iter=eps * attack.eps_iter_ratio(), loss_fn=loss_fn, rand_init=attack.rand_init,
        decay_factor=float(attack.decay_factor), clip_min=clip_min, clip_max=clip_max)
