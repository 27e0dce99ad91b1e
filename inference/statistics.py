"""Aggregate results over seeds: the interquartile mean with stratified bootstrap confidence
intervals (Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the Statistical
Precipice", NeurIPS; the estimator the KalMamba paper reports, as the ``rliable`` package
computes it).

Scores are an array ``(runs, tasks)``: one entry per seed and task (or per seed and metric).

    IQM(x)  = mean of the middle 50% of all entries of x          (scipy's trim_mean, 25% cut)
    CI      = [q_{alpha/2}, q_{1-alpha/2}] of IQM(x*) over bootstrap samples x*, where each
              x* resamples the runs with replacement *within each task* (stratified)

The percentile interval of the stratified bootstrap is rliable's default. With one task it is
the ordinary percentile bootstrap of the runs.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import stats


class Interval(NamedTuple):
    """A point estimate and its confidence interval ``[low, high]``, over ``runs`` runs."""

    estimate: float
    low: float
    high: float
    runs: int


def iqm(scores) -> float:
    """Interquartile mean of all entries: the mean after cutting 25% at each end."""
    x = np.asarray(scores, np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"need finite scores, got {x}")
    return float(stats.trim_mean(x, proportiontocut=0.25))


def mean(scores) -> float:
    """Mean of all entries (for the metrics where every run counts, e.g. R^2 over 5 seeds)."""
    x = np.asarray(scores, np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"need finite scores, got {x}")
    return float(x.mean())


def stratified_bootstrap(
    scores,
    statistic: Callable[[np.ndarray], float] = iqm,
    *,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``statistic(scores)`` with its stratified-bootstrap percentile interval.

    Args:
        scores: ``(runs,)`` or ``(runs, tasks)``; runs are resampled within each task column.
        statistic: maps a ``(runs, tasks)`` array to a number (default: :func:`iqm`).
        reps: bootstrap samples.
        confidence: coverage of the interval (0.95: the 2.5% and 97.5% percentiles).
        seed: the resampling's random generator.
    """
    x = np.asarray(scores, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"scores must be (runs,) or (runs, tasks), got shape {x.shape}")
    if not 0 < confidence < 1 or reps < 1:
        raise ValueError(f"need 0 < confidence < 1 and reps >= 1, got {confidence}, {reps}")
    runs, tasks = x.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(reps, runs, tasks))
    samples = np.take_along_axis(np.broadcast_to(x, (reps, runs, tasks)), idx, axis=1)
    boot = np.array([statistic(s) for s in samples])
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(statistic(x)), float(lo), float(hi), runs)
