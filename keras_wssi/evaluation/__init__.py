"""Robustness evaluation of trained models: attacks, noise, weight perturbations, reports.

`diagnostics` checks a model for gradient masking (five checks, in words); `statistics` gives Student-t
intervals and Welch's test over seeds.

Gradient attacks are cleverhans's own `tf2` functions run batched and compiled (`AttackRunner`); CW-L2 and
the gradient-free Square attack come from the Adversarial Robustness Toolbox (optional extra). On the JAX backend
the gradient attacks are cleverhans.jax's or keras_wssi's keras.ops transcription of cleverhans.tf2
(`gradient_attacks`), ART's are refused with a replacement named, and every result records its `implementation`. keras_wssi's own
compiled APGD-CE, APGD-T, FAB-T and Square (`compiled_attacks`) make up the AutoAttack-style ensemble
(`autoattack`). Curves of every family go into one `Report` (JSON, Markdown, PNG). `weight_perturbation` is
imported on demand.
"""

from keras_wssi.evaluation import diagnostics
from keras_wssi.evaluation import statistics
from keras_wssi.evaluation.attacks import ATTACKS
from keras_wssi.evaluation.attacks import Attack
from keras_wssi.evaluation.attacks import EvaluationError
from keras_wssi.evaluation.attacks import get_attack
from keras_wssi.evaluation.attacks import logits_function
from keras_wssi.evaluation.attacks import seeded_random_start
from keras_wssi.evaluation.ensemble import ATTACK_NAMES
from keras_wssi.evaluation.ensemble import AUTOATTACK_VERSIONS
from keras_wssi.evaluation.ensemble import autoattack
from keras_wssi.evaluation.diagnostics import gradient_masking_checks
from keras_wssi.evaluation.noise import NOISE_KINDS
from keras_wssi.evaluation.noise import noise_accuracy
from keras_wssi.evaluation.report import Report
from keras_wssi.evaluation.report import load_report
from keras_wssi.evaluation.robustness import evaluate_model
from keras_wssi.evaluation.robustness import jacobian_statistics
from keras_wssi.evaluation.robustness import load_model
from keras_wssi.evaluation.runner import AttackRunner
from keras_wssi.evaluation.runner import check_dataset
from keras_wssi.evaluation.runner import clean_metrics
from keras_wssi.evaluation.statistics import confidence_interval
from keras_wssi.evaluation.statistics import welch_test

__all__ = [
    "ATTACKS",
    "ATTACK_NAMES",
    "AUTOATTACK_VERSIONS",
    "Attack",
    "AttackRunner",
    "EvaluationError",
    "NOISE_KINDS",
    "Report",
    "autoattack",
    "check_dataset",
    "clean_metrics",
    "confidence_interval",
    "diagnostics",
    "evaluate_model",
    "get_attack",
    "gradient_masking_checks",
    "jacobian_statistics",
    "load_model",
    "load_report",
    "logits_function",
    "noise_accuracy",
    "seeded_random_start",
    "statistics",
    "welch_test",
]
