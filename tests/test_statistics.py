"""Interquartile mean and stratified bootstrap intervals (inference.statistics)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.statistics import iqm, mean, stratified_bootstrap


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8).flatmap(
    lambda k: st.lists(st.floats(-1e3, 1e3), min_size=4 * k, max_size=4 * k)))  # fmt: skip
def test_iqm_is_the_mean_of_the_middle_half(xs):
    x = np.sort(np.asarray(xs))
    n = len(x)
    np.testing.assert_allclose(iqm(xs), x[n // 4 : 3 * n // 4].mean(), rtol=1e-12, atol=1e-9)


def test_bootstrap_of_the_mean_matches_the_enumerated_distribution():
    """Three runs of one task: the 27 equally likely resamples, enumerated, give the exact
    bootstrap distribution of the mean; 20000 draws reproduce its quantiles."""
    x = np.array([0.0, 1.0, 5.0])
    exact = np.sort([np.mean(c) for c in itertools.product(x, repeat=3)])
    ci = stratified_bootstrap(x, mean, reps=20000, confidence=0.8, seed=1)
    # the 10% and 90% quantiles of the exact distribution (27 atoms: no atom on the boundary)
    assert ci.low == pytest.approx(np.quantile(exact, 0.1, method="inverted_cdf"), abs=1e-12)
    assert ci.high == pytest.approx(np.quantile(exact, 0.9, method="inverted_cdf"), abs=1e-12)
    assert ci.estimate == 2.0 and ci.runs == 3


def test_resampling_is_stratified_by_task():
    scores = np.column_stack([np.arange(5.0), 10 + np.arange(5.0)])
    seen = []
    stratified_bootstrap(scores, lambda s: seen.append(s.copy()) or 0.0, reps=50, seed=0)
    for s in seen[:-1]:  # each sample keeps every task's runs in that task's column
        assert set(s[:, 0]) <= set(range(5)) and set(s[:, 1]) <= set(10 + np.arange(5.0))


def test_interval_contains_the_estimate_and_collapses_for_identical_runs():
    rng = np.random.default_rng(0)
    ci = stratified_bootstrap(rng.normal(size=(5, 3)), seed=2)
    assert ci.low <= ci.estimate <= ci.high
    flat = stratified_bootstrap(np.full((4, 2), 3.5))
    assert flat == (3.5, 3.5, 3.5, 4)
    with pytest.raises(ValueError, match="finite"):
        iqm([1.0, np.nan])
