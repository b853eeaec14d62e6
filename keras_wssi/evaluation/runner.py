"""The batched, compiled attack loop: cleverhans's attack traced once into a `tf.function` (on JAX: `jax.jit` of
`gradient_attacks.run_batch`), run batch by batch.

One graph per (model, attack, batch size) is traced with `ε`, the restart number and the example indices
as inputs, so a whole ε-curve over a test set reuses it: no retracing per batch, per ε or for the last
(padded) batch. Memory is bounded by `batch_size`. XLA is available (`jit_compile=True`) but off by
default: on this project's reference CPU it did not speed PGD up on an MLP and slowed convolutions ~4×
(see docs/evaluation.md); on GPUs try it.
"""

import time

import keras
import numpy as np
from keras import ops

from keras_wssi import backend
from keras_wssi import labels as labels_module
from keras_wssi.evaluation import attacks as attacks_module
from keras_wssi.evaluation import compiled_attacks
from keras_wssi.evaluation import gradient_attacks
from keras_wssi.evaluation.attacks import EvaluationError

__all__ = ["AttackRunner", "check_dataset", "clean_metrics"]


def check_dataset(images, labels, model=None, name="images"):
    """Validates an evaluation set: non-empty, matching lengths, integer labels, the model's input shape.

    Args:
        images: array `(N, …)` of floating-point inputs.
        labels: integer class labels `(N,)` (one-hot `(N, C)` is accepted and converted).
        model: optional model whose input shape the images must match.
        name: the argument name used in error messages.

    Returns:
        `(images, labels)` as float32 and int32 NumPy arrays.

    Example:

    ```python
    images, labels = check_dataset(x_test, y_test, model)   # raises EvaluationError naming the problem
    ```
    """
    if images is None or labels is None:
        raise EvaluationError(f"{name} and labels are required, got {type(images).__name__} and "
                              f"{type(labels).__name__}.")
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 0 or len(images) == 0:
        raise EvaluationError(f"The dataset is empty: {name} has shape {images.shape}; nothing to evaluate.")
    if labels.ndim == 2:
        try:
            labels = labels_module.class_indices(labels, None, "labels")  # One-hot rows or (N, 1).
        except ValueError as error:
            raise EvaluationError(str(error)) from None
    if labels.ndim != 1 or len(labels) != len(images):
        raise EvaluationError(
            f"labels must be integer classes of shape ({len(images)},) to match {name}, got shape {labels.shape}."
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise EvaluationError(
            f"{name} must be floating point in the clip range (e.g. images / 255), got dtype {images.dtype}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if np.all(np.equal(np.mod(labels, 1), 0)):
            labels = labels.astype(np.int64)
        else:
            raise EvaluationError(f"labels must be integers, got dtype {labels.dtype}.")
    if model is not None:
        expected = _input_shape(model)
        if expected is not None:
            actual = tuple(images.shape[1:])
            if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
                raise EvaluationError(
                    f"{name} have per-example shape {actual}, but model {model.name!r} expects {tuple(expected)}."
                )
    return images.astype(np.float32, copy=False), labels.astype(np.int32, copy=False)


def _input_shape(model):
    inputs = getattr(model, "inputs", None)
    try:
        if inputs:
            return tuple(inputs[0].shape[1:])
    except (AttributeError, TypeError):
        pass
    return None


def _check_clip(images, clip_min, clip_max):
    if clip_min is None or clip_max is None:
        if clip_min is not None or clip_max is not None:
            raise EvaluationError("clip_min and clip_max must be given together (cleverhans clips both sides).")
        return
    if not clip_min < clip_max:
        raise EvaluationError(f"clip_min must be < clip_max, got {clip_min} and {clip_max}.")
    low, high = float(images.min()), float(images.max())
    if low < clip_min - 1e-6 or high > clip_max + 1e-6:
        raise EvaluationError(
            f"images range over [{low:.4g}, {high:.4g}], outside the clip range [{clip_min}, {clip_max}]: scale them "
            "(e.g. / 255) or set clip_min/clip_max."
        )


def _batches(count, batch_size):
    for start in range(0, count, batch_size):
        yield start, min(start + batch_size, count)


def _padded(array, start, stop, batch_size):
    chunk = array[start:stop]
    missing = batch_size - len(chunk)
    if missing:
        # Repeating the last example keeps the pad inside the clip range; its results are dropped.
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)], axis=0)
    return chunk


def _predicted(logits):
    return ops.cast(ops.argmax(logits, axis=1), "int32")


def predict_correct(logits_fn, images, labels, batch_size, variables=()):
    """Per example, whether `logits_fn` classifies `images` correctly (one compiled forward pass per batch; the
    compiled function is kept with `logits_fn`)."""
    forward = compiled_attacks.cached(logits_fn, ("predict", tuple(id(v) for v in variables)), lambda: (
        compiled_attacks.compile_function(lambda x: _predicted(ops.cast(logits_fn(x), "float32")),
                                          variables=variables)))
    correct = []
    size = min(batch_size, len(images))  # The last batch is padded: one compiled size.
    for start, stop in _batches(len(images), batch_size):
        predicted = ops.convert_to_numpy(forward(ops.convert_to_tensor(_padded(images, start, stop, size))))
        correct.append(predicted[: stop - start] == labels[start:stop])
    return np.concatenate(correct) if correct else np.zeros(0, bool)


def clean_metrics(model, images, labels, batch_size=256, recover_logits=False):
    """Accuracy and mean softmax cross-entropy (on logits) of a model on a data set, in one compiled pass.

    Args:
        model: a Keras classifier outputting logits (see `logits_function`).
        images: float inputs `(N, …)`.
        labels: int labels `(N,)`.
        batch_size: examples per forward pass.
        recover_logits: accept a softmax output (see `logits_function`).

    Returns:
        `{"accuracy": float, "loss": float, "examples": N}`.

    Example:

    ```python
    clean_metrics(model, x_test[:1000], y_test[:1000])   # {"accuracy": 0.98, "loss": 0.06, "examples": 1000}
    ```
    """
    images, labels = check_dataset(images, labels, model)
    logits_fn, _ = attacks_module.logits_function(model, images[:64], recover_logits=recover_logits)

    def forward(x, y):
        logits = ops.cast(logits_fn(x), "float32")
        loss = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return _predicted(logits) == y, loss

    forward = compiled_attacks.compile_function(forward, variables=model.variables)
    correct_total, loss_total = 0.0, 0.0
    size = min(batch_size, len(images))  # The last batch is padded: one compiled size.
    for start, stop in _batches(len(images), batch_size):
        correct, loss = forward(ops.convert_to_tensor(_padded(images, start, stop, size)),
                                ops.convert_to_tensor(_padded(labels, start, stop, size)))
        # Summed in float64 on the host (JAX has no float64 without x64).
        correct_total += float(np.sum(ops.convert_to_numpy(correct)[: stop - start], dtype=np.float64))
        loss_total += float(np.sum(ops.convert_to_numpy(loss)[: stop - start], dtype=np.float64))
    return {"accuracy": correct_total / len(images), "loss": loss_total / len(images), "examples": len(images)}


class AttackRunner:
    """Runs one attack over a data set, batched and compiled; cleverhans computes every adversarial example.

    The attack function (e.g. `cleverhans.tf2.attacks.projected_gradient_descent`) is traced once into a
    `tf.function` whose inputs are the batch, the true labels, the example indices, `ε` and the restart
    number, then called batch by batch. The last batch is padded to `batch_size`, so nothing retraces.
    Random starts are keyed by `(seed, restart, example index)` (`seeded_random_start`), so results do
    not depend on `batch_size`. ART attacks (`"cw_l2"`, `"square"`) run through ART's own batching.
    keras_wssi's own attacks (`"apgd_ce"`, `"apgd_t"`, `"fab_t"`, `"square_compiled"`, …) run their compiled
    kernels (`compiled_attacks.run_attack`) on the clean-correct examples, keyed by `(seed, example index)`.

    Args:
        model: a Keras classifier (logits; see `logits_function`).
        attack: an `Attack` or a name from `ATTACKS`.
        batch_size: examples per compiled call: bounds memory.
        seed: seed of random starts (and of ART's NumPy sampling).
        clip_min: smallest valid input value (None with clip_max for no clipping).
        clip_max: largest valid input value.
        jit_compile: compile the attack graph with XLA.
        recover_logits: accept a softmax output (see `logits_function`).
        progress: show a Keras progress bar.

    Example:

    ```python
    runner = AttackRunner(model, get_attack("pgd", nb_iter=40), batch_size=500)
    curve = runner.robust_accuracy(x_test, y_test, epsilons=[0.0, 0.05, 0.1, 0.2])
    curve["accuracy"]          # one robust accuracy per ε
    x_adv = runner.generate(x_test[:100], y_test[:100], eps=0.1)
    ```
    """

    def __init__(
        self,
        model,
        attack,
        batch_size=256,
        seed=0,
        clip_min=0.0,
        clip_max=1.0,
        jit_compile=False,
        recover_logits=False,
        progress=True,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(seed, (int, np.integer)):
            raise EvaluationError(f"seed must be an integer, got {seed!r}.")
        self.model = model
        self.attack = attacks_module.get_attack(attack)
        attacks_module.check_backend(self.attack)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.clip_min = None if clip_min is None else float(clip_min)
        self.clip_max = None if clip_max is None else float(clip_max)
        self.jit_compile = bool(jit_compile)
        self.recover_logits = recover_logits
        self.progress = progress
        self.logits_note = ""
        self._logits_fn = None
        self._num_classes = None
        self._compiled = None

    # -- setup -------------------------------------------------------------------------------------------

    def _prepare(self, images, labels):
        images, labels = check_dataset(images, labels, self.model)
        _check_clip(images, self.clip_min, self.clip_max)
        if self._logits_fn is None:
            self._logits_fn, self.logits_note = attacks_module.logits_function(
                self.model, images[:64], recover_logits=self.recover_logits
            )
            self._num_classes = int(ops.shape(self._logits_fn(images[:1]))[-1])
        return images, labels

    def _compiled_attack(self, example_shape):
        if self._compiled is not None:
            return self._compiled
        if backend.BACKEND != "tensorflow":
            return self._compiled_attack_jax()
        import tensorflow as tf

        attack, logits_fn = self.attack, self._logits_fn
        attack_fn = attack.cleverhans_function()
        clip_min, clip_max, seed = self.clip_min, self.clip_max, self.seed
        signature = [
            tf.TensorSpec([self.batch_size, *example_shape], tf.float32),
            tf.TensorSpec([self.batch_size], tf.int32),
            tf.TensorSpec([self.batch_size], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
        ]

        def model_fn(x):
            return tf.cast(logits_fn(x), tf.float32)

        @tf.function(input_signature=signature, jit_compile=self.jit_compile)
        def run(x, y, indices, eps, restart):
            with attacks_module.seeded_random_start(seed, restart, indices):
                x_adv = attack_fn(model_fn, x, y=y, **attack.cleverhans_kwargs(eps, clip_min, clip_max))
            logits = model_fn(x_adv)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            correct = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y)
            return x_adv, correct, loss

        self._compiled = run
        return run

    def _compiled_attack_jax(self):
        """The JAX counterpart of the cleverhans.tf2 graph: cleverhans.jax or the keras.ops transcription
        (`gradient_attacks`), compiled with `jax.jit`, the random start keyed by `(seed, restart, example index)`."""
        attack, logits_fn = self.attack, self._logits_fn
        clip_min, clip_max = self.clip_min, self.clip_max
        key = compiled_attacks.run_key(self.seed, "random_start", 0)
        loss_fn = attacks_module._adapt_loss(attack.loss)
        num_classes = self._num_classes

        def model_fn(x):
            return ops.cast(logits_fn(x), "float32")

        def run(x, y, indices, eps, restart):
            x_adv = gradient_attacks.run_batch(attack, model_fn, x, y, indices, eps, key, restart, clip_min,
                                               clip_max, num_classes, loss_fn=loss_fn)
            logits = model_fn(x_adv)
            loss = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return x_adv, _predicted(logits) == y, loss

        variables = self.model.variables
        cache_key = ("cleverhans_jax", attack, clip_min, clip_max, self.seed, tuple(id(v) for v in variables))
        self._compiled = compiled_attacks.cached(
            logits_fn, cache_key, lambda: compiled_attacks.compile_function(run, variables=variables))
        return self._compiled

    # -- cleverhans attacks ------------------------------------------------------------------------------

    def _attack_batch(self, images, labels, start, stop, eps):
        """Adversarial examples of one batch, resolved over restarts: `(x_adv, correct)`."""
        run = self._compiled_attack(images.shape[1:])
        x = ops.convert_to_tensor(_padded(images, start, stop, self.batch_size))
        y = ops.convert_to_tensor(_padded(labels, start, stop, self.batch_size))
        indices = ops.convert_to_tensor(_padded(np.arange(len(images), dtype=np.int32), start, stop, self.batch_size))
        count = stop - start
        best_adv = best_correct = best_loss = None
        for restart in range(self.attack.restarts):
            outputs = run(x, y, indices, ops.convert_to_tensor(np.float32(eps)),
                          ops.convert_to_tensor(np.int32(restart)))
            x_adv, correct, loss = (ops.convert_to_numpy(value)[:count] for value in outputs)
            if best_adv is None:
                best_adv, best_correct, best_loss = x_adv, correct, loss
                continue
            # An example is broken if any restart breaks it; among unbroken ones keep the highest loss.
            take = (best_correct & ~correct) | (best_correct & correct & (loss > best_loss))
            best_adv = np.where(take.reshape((-1,) + (1,) * (x_adv.ndim - 1)), x_adv, best_adv)
            best_loss = np.where(take, loss, best_loss)
            best_correct = best_correct & correct
        return best_adv, best_correct

    def generate(self, images, labels, eps):
        """Adversarial examples for every image at one `ε` (NumPy, same shape as `images`).

        For attacks with restarts, each example's result is the first restart that fools the model, or the
        highest-loss one when none does. For `"cw_l2"` `eps` is ignored: its minimal perturbations are returned.
        """
        eps = attacks_module.check_epsilons([eps], "eps")[0]
        images, labels = self._prepare(images, labels)
        if self.attack.library == "art":
            return self._art_attack(images, labels, eps)[0]
        if self.attack.library == "keras_wssi":
            return self._own_attack(images, labels, eps)[0]
        outputs = []
        for start, stop in _batches(len(images), self.batch_size):
            outputs.append(self._attack_batch(images, labels, start, stop, eps)[0])
        return np.concatenate(outputs, axis=0)

    def robust_accuracy(self, images, labels, epsilons):
        """Accuracy under the attack for each `ε`: a curve dict for `Report.add_curve`.

        Args:
            images: float inputs `(N, …)` inside `[clip_min, clip_max]`.
            labels: int labels `(N,)`.
            epsilons: perturbation sizes (≥ 0) in the attack's norm.

        Returns:
            `{"epsilons", "accuracy", "max_perturbation", "settings", "seconds"}`; `max_perturbation` is the
            largest perturbation norm found at each ε (a check that the ball was respected).
        """
        epsilons = attacks_module.check_epsilons(epsilons)
        images, labels = self._prepare(images, labels)
        started = time.perf_counter()
        if self.attack.library == "art":
            accuracy, max_norms = self._art_curve(images, labels, epsilons)
        elif self.attack.library == "keras_wssi":
            accuracy, max_norms = [], []
            for eps in epsilons:
                x_adv, correct, _ = self._own_attack(images, labels, eps)
                accuracy.append(float(np.mean(correct)))
                max_norms.append(float(_norms(x_adv - images, self.attack.norm).max()))
        else:
            accuracy, max_norms = [], []
            batches = list(_batches(len(images), self.batch_size))
            bar = keras.utils.Progbar(len(batches) * len(epsilons), verbose=1 if self.progress else 0,
                                      unit_name="batch")
            for eps in epsilons:
                correct_total, max_norm = 0, 0.0
                for start, stop in batches:
                    x_adv, correct = self._attack_batch(images, labels, start, stop, eps)
                    correct_total += int(correct.sum())
                    max_norm = max(max_norm, float(_norms(x_adv - images[start:stop], self.attack.norm).max()))
                    bar.add(1, values=[("eps", eps), ("robust_acc", correct_total / stop)])
                accuracy.append(correct_total / len(images))
                max_norms.append(max_norm)
        settings = self.settings()
        settings["examples"] = len(images)
        if self.logits_note:
            settings["logits"] = self.logits_note
        return {
            "epsilons": epsilons,
            "accuracy": accuracy,
            "max_perturbation": max_norms,
            "settings": settings,
            "seconds": time.perf_counter() - started,
        }

    def settings(self):
        """Attack and runner settings (JSON-ready)."""
        settings = self.attack.settings()
        settings.update(
            {
                "batch_size": self.batch_size,
                "seed": self.seed,
                "clip_min": self.clip_min,
                "clip_max": self.clip_max,
                "jit_compile": self.jit_compile if self.attack.library != "art" else None,
            }
        )
        return settings

    # -- keras_wssi's compiled attacks (apgd_ce, apgd_t, fab_t, square_compiled, …) ----------------------

    def _own_attack(self, images, labels, eps):
        """`(x_adv, correct, forwards)` of an own attack: only clean-correct examples are attacked."""
        clean_correct = self._predict_correct(images, labels)
        if eps == 0:
            return images.copy(), clean_correct, np.zeros(len(images), np.int64)
        if self._compiled is None:
            self._compiled = compiled_attacks.attack_kernel(
                self.attack, self._logits_fn, images.shape[1:], jit_compile=self.jit_compile,
                clip_min=self.clip_min, clip_max=self.clip_max, variables=self.model.variables,
            )
        runs = compiled_attacks.attack_runs(self.attack, self.seed, self._num_classes)
        x_adv, robust, forwards = compiled_attacks.run_attack(
            self._compiled, images, labels, eps, clean_correct, runs, self.batch_size
        )
        return x_adv, robust, forwards

    # -- ART attacks (cw_l2, square) ---------------------------------------------------------------------

    def _art_classifier(self, images):
        import tensorflow as tf

        try:
            from art.estimators.classification import TensorFlowV2Classifier
        except ImportError as error:
            raise EvaluationError(
                f"Attack {self.attack.name!r} needs the Adversarial Robustness Toolbox (cleverhans 4.0.0's own "
                "carlini_wagner_l2 and spsa do not run on Keras 3): pip install \"keras_wssi[attacks]\" "
                "(adversarial-robustness-toolbox)."
            ) from error
        logits_fn = self._logits_fn
        sample_logits = logits_fn(images[:1])

        def model(x, training=False):
            return tf.cast(logits_fn(x), tf.float32)

        clip = None if self.clip_min is None else (self.clip_min, self.clip_max)
        return TensorFlowV2Classifier(
            model=model,
            nb_classes=int(sample_logits.shape[-1]),
            input_shape=tuple(images.shape[1:]),
            loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            clip_values=clip,
        )

    def _predict_correct(self, images, labels):
        return predict_correct(self._logits_fn, images, labels, self.batch_size, variables=self.model.variables)

    def _art_attack(self, images, labels, eps):
        from art.attacks import evasion

        classifier = self._art_classifier(images)
        options = dict(self.attack.options)
        np.random.seed(self.seed)
        if self.attack.method == "cw_l2":
            art_attack = evasion.CarliniL2Method(classifier, targeted=False, batch_size=self.batch_size,
                                                 verbose=False, **options)
            x_adv = art_attack.generate(x=images, y=labels).astype(np.float32)
        else:
            if eps == 0:
                return images.copy(), self._predict_correct(images, labels)
            art_attack = evasion.SquareAttack(classifier, norm=self.attack.ord, eps=eps,
                                              nb_restarts=self.attack.restarts, batch_size=self.batch_size,
                                              verbose=False, **options)
            x_adv = art_attack.generate(x=images, y=labels).astype(np.float32)
        return x_adv, self._predict_correct(x_adv, labels)

    def _art_curve(self, images, labels, epsilons):
        if self.attack.minimal_perturbation:
            # One CW-L2 run gives each example's smallest found perturbation; an example is robust at ε when it
            # is classified correctly and the attack failed or needed a perturbation larger than ε.
            clean_correct = self._predict_correct(images, labels)
            x_adv, adv_correct = self._art_attack(images, labels, 0.0)
            norms = _norms(x_adv - images, "l2")
            found = clean_correct & ~adv_correct
            accuracy = [float(np.mean(clean_correct & (~found | (norms > eps)))) for eps in epsilons]
            max_norms = [float(norms[found & (norms <= eps)].max(initial=0.0)) for eps in epsilons]
            return accuracy, max_norms
        accuracy, max_norms = [], []
        bar = keras.utils.Progbar(len(epsilons), verbose=1 if self.progress else 0, unit_name="eps")
        for eps in epsilons:
            x_adv, correct = self._art_attack(images, labels, eps)
            accuracy.append(float(np.mean(correct)))
            max_norms.append(float(_norms(x_adv - images, self.attack.norm).max()))
            bar.add(1, values=[("robust_acc", accuracy[-1])])
        return accuracy, max_norms


def _norms(delta, norm):
    flat = np.asarray(delta, dtype=np.float64).reshape(len(delta), -1)
    if norm == "linf":
        return np.abs(flat).max(axis=1)
    return np.sqrt(np.square(flat).sum(axis=1))
