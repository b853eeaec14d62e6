"""Error bars for results over seeds: Student-t confidence intervals and Welch's test of a difference.

A number from one training run mixes the method's effect with the seed's (initialization, batch order,
attack starts). Train K seeds per configuration, then report `mean ± half-width` of a confidence interval and
test whether two configurations differ. Everything here is plain NumPy (SciPy is not a dependency of the
library; the tests check these functions against `scipy.stats`):

- `confidence_interval`: the Student-t interval `mean ± t_{1−α/2, n−1} · s / √n` (the default, and the only
  method: with 3–10 seeds the normal interval would be too narrow). `s` is the sample standard deviation
  (`ddof=1`).
- `welch_test`: Welch's unequal-variance t-test, `t = (m_a − m_b) / √(s_a²/n_a + s_b²/n_b)` with the
  Welch–Satterthwaite degrees of freedom, and a two-sided p-value.
- `summarize`: per-metric mean, standard deviation, interval and count over a list of per-seed metric dicts.

The t distribution's CDF is the regularized incomplete beta function (continued fraction, Numerical Recipes
§6.4), and its quantile is found by bisection on the CDF, to ~1e-12.
"""

import math

import numpy as np

from keras_wssi.evaluation.attacks import EvaluationError

__all__ = [
    "DEFAULT_CONFIDENCE",
    "confidence_interval",
    "student_t_cdf",
    "student_t_quantile",
    "summarize",
    "welch_test",
]

DEFAULT_CONFIDENCE = 0.95


def _check_values(values, name, minimum=2):
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be a list of numbers, got {values!r}.") from None
    if array.size < minimum:
        raise EvaluationError(
            f"{name} needs at least {minimum} values (one per seed) for an interval or a test, got {array.size}."
        )
    if not np.all(np.isfinite(array)):
        raise EvaluationError(f"{name} contains a non-finite value: {array.tolist()}.")
    return array


def _check_confidence(confidence):
    if not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise EvaluationError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}.")
    return float(confidence)


def _continued_fraction_beta(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes `betacf`."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _regularized_incomplete_beta(a, b, x):
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction_beta(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction_beta(b, a, 1.0 - x) / b


def student_t_cdf(t, df):
    """`P(T ≤ t)` for Student's t with `df` degrees of freedom (real `df > 0`, as Welch's test needs).

    Example:

    ```python
    student_t_cdf(2.776, 4)   # ≈ 0.975
    ```
    """
    if not df > 0:
        raise EvaluationError(f"df must be > 0, got {df!r}.")
    t = float(t)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(probability, df):
    """The `probability` quantile of Student's t with `df` degrees of freedom (bisection on the CDF).

    Example:

    ```python
    student_t_quantile(0.975, 2)   # ≈ 4.303, the factor of a 95% interval over 3 seeds
    ```
    """
    if not 0.0 < probability < 1.0:
        raise EvaluationError(f"probability must be in (0, 1), got {probability!r}.")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
        if high > 1e12:
            raise EvaluationError(f"The t quantile {probability} with df={df} is too far out to compute.")
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def confidence_interval(values, confidence=DEFAULT_CONFIDENCE):
    """The Student-t confidence interval of the mean of `values` (one value per seed).

    `mean ± t_{(1+confidence)/2, n−1} · s / √n`, `s` the sample standard deviation. It assumes the per-seed
    values are independent draws from a roughly normal distribution; with 3 seeds the factor is 4.30 (95%).

    Args:
        values: at least two numbers.
        confidence: coverage probability in (0, 1), default 0.95.

    Returns:
        `{"mean", "std", "n", "half_width", "low", "high", "confidence", "method"}`.

    Example:

    ```python
    confidence_interval([0.971, 0.975, 0.969])["half_width"]   # ≈ 0.0076
    ```
    """
    array = _check_values(values, "values")
    confidence = _check_confidence(confidence)
    n = array.size
    mean = float(array.mean())
    std = float(array.std(ddof=1))
    half_width = student_t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "half_width": half_width,
        "low": mean - half_width,
        "high": mean + half_width,
        "confidence": confidence,
        "method": "student_t",
    }


def welch_test(a, b):
    """Welch's unequal-variance t-test of `mean(a) = mean(b)` (two-sided).

    Args:
        a: per-seed values of one configuration (at least two).
        b: per-seed values of the other.

    Returns:
        `{"difference", "t", "df", "p_value", "method"}`: `difference = mean(a) − mean(b)`; when both samples
        have zero variance, `t` is ±inf (p = 0) for different means and 0 (p = 1) for equal ones.

    Example:

    ```python
    welch_test([0.70, 0.72, 0.69], [0.10, 0.13, 0.12])["p_value"]   # ≈ 1e-5: the configurations differ
    ```
    """
    a = _check_values(a, "a")
    b = _check_values(b, "b")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    difference = float(a.mean() - b.mean())
    standard_error = math.sqrt(va + vb)
    if standard_error == 0.0:
        equal = difference == 0.0
        return {"difference": difference, "t": 0.0 if equal else math.copysign(math.inf, difference),
                "df": float(a.size + b.size - 2), "p_value": 1.0 if equal else 0.0, "method": "welch"}
    t = difference / standard_error
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    p_value = 2.0 * student_t_cdf(-abs(t), df)
    return {"difference": difference, "t": float(t), "df": float(df), "p_value": float(min(1.0, p_value)),
            "method": "welch"}


def summarize(runs, confidence=DEFAULT_CONFIDENCE):
    """Mean, standard deviation and confidence interval of every numeric metric over runs (one dict per seed).

    A metric missing from some runs, or non-numeric, is skipped; a metric present in every run gets an entry.

    Args:
        runs: list of flat dicts `{metric: number}`, one per seed (at least two).
        confidence: interval coverage.

    Returns:
        `{metric: confidence_interval(...) + {"values": [...]}}`.

    Example:

    ```python
    summarize([{"accuracy": 0.97}, {"accuracy": 0.98}, {"accuracy": 0.975}])["accuracy"]["mean"]   # 0.975
    ```
    """
    if not isinstance(runs, (list, tuple)) or len(runs) < 2:
        raise EvaluationError(f"runs must be a list of at least two metric dicts (one per seed), got {runs!r}.")
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {}
    for key in keys:
        values = [run.get(key) for run in runs]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
            continue
        entry = confidence_interval(values, confidence)
        entry["values"] = [float(v) for v in values]
        summary[key] = entry
    return summary
