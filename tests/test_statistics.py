"""Confidence intervals and Welch's test over seeds, checked against SciPy and against a known distribution."""

import numpy as np
import pytest
from scipy import stats

from keras_wssi.evaluation import EvaluationError
from keras_wssi.evaluation import statistics


@pytest.mark.parametrize("df", [1, 2, 2.7, 5, 29, 300])
def test_t_distribution_matches_scipy(df):
    for t in (-8.0, -2.0, -0.3, 0.0, 0.4, 1.7, 4.3, 12.0):
        assert statistics.student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-11)
    for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.025):
        assert statistics.student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_interval_matches_scipy_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        for confidence in (0.9, 0.95, 0.99):
            values = rng.normal(0.8, 0.05, n)
            ours = statistics.confidence_interval(values, confidence)
            low, high = stats.t.interval(confidence, n - 1, loc=values.mean(), scale=stats.sem(values))
            assert ours["low"] == pytest.approx(low, rel=1e-9) and ours["high"] == pytest.approx(high, rel=1e-9)
            assert ours["method"] == "student_t" and ours["n"] == n


def test_interval_covers_the_true_mean_at_its_nominal_rate():
    # 4,000 simulated experiments of 3 seeds each from N(0.7, 0.02²): the 95% t interval must contain 0.7 in
    # 95% ± 1.1% (3 binomial standard errors) of them; the normal (z) interval, too narrow for 3 seeds, does not.
    rng = np.random.default_rng(1)
    draws = rng.normal(0.7, 0.02, (4000, 3))
    covered = [(r := statistics.confidence_interval(d))["low"] <= 0.7 <= r["high"] for d in draws]
    coverage = np.mean(covered)
    tolerance = 3 * np.sqrt(0.95 * 0.05 / len(draws))
    assert abs(coverage - 0.95) < tolerance, coverage
    z_half = 1.959964 * draws.std(axis=1, ddof=1) / np.sqrt(3)
    z_coverage = np.mean(np.abs(draws.mean(axis=1) - 0.7) <= z_half)
    assert z_coverage < 0.95 - tolerance, z_coverage


def test_welch_test_matches_scipy():
    rng = np.random.default_rng(2)
    for n_a, n_b in ((3, 3), (3, 5), (10, 4)):
        a, b = rng.normal(0.5, 0.03, n_a), rng.normal(0.53, 0.08, n_b)
        ours = statistics.welch_test(a, b)
        reference = stats.ttest_ind(a, b, equal_var=False)
        assert ours["t"] == pytest.approx(reference.statistic, rel=1e-10)
        assert ours["p_value"] == pytest.approx(reference.pvalue, rel=1e-8)
        assert ours["difference"] == pytest.approx(a.mean() - b.mean())


def test_welch_test_false_positive_rate_is_nominal():
    # Under the null (same distribution, unequal sample variance is allowed), p < 0.05 in ~5% of experiments.
    rng = np.random.default_rng(3)
    p_values = np.array([statistics.welch_test(rng.normal(0, 1, 3), rng.normal(0, 2, 3))["p_value"]
                         for _ in range(3000)])
    assert abs(np.mean(p_values < 0.05) - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 3000) + 0.005


def test_zero_variance_and_bad_input():
    assert statistics.welch_test([1, 1, 1], [1, 1, 1])["p_value"] == 1.0
    assert statistics.welch_test([1, 1, 1], [0, 0, 0])["p_value"] == 0.0
    assert statistics.confidence_interval([0.5, 0.5, 0.5])["half_width"] == 0.0
    with pytest.raises(EvaluationError, match="at least 2 values"):
        statistics.confidence_interval([0.9])
    with pytest.raises(EvaluationError, match="non-finite"):
        statistics.confidence_interval([0.9, float("nan")])
    with pytest.raises(EvaluationError, match="confidence must be"):
        statistics.confidence_interval([0.9, 0.8], confidence=95)
    with pytest.raises(EvaluationError, match="at least 2 values"):
        statistics.welch_test([0.9, 0.8], [0.1])


def test_summarize_every_shared_numeric_metric():
    runs = [{"accuracy": 0.97, "loss": 0.1, "name": "a"}, {"accuracy": 0.98, "loss": 0.2, "name": "b"},
            {"accuracy": 0.975, "name": "c"}]
    summary = statistics.summarize(runs)
    assert set(summary) == {"accuracy"}
    assert summary["accuracy"]["mean"] == pytest.approx(0.975)
    assert summary["accuracy"]["values"] == [0.97, 0.98, 0.975]
    with pytest.raises(EvaluationError, match="at least two"):
        statistics.summarize(runs[:1])
