"""Sampling and scoring Gauss-Markov chains given by square roots: FFBS, smoothed-dynamics paths.

As :mod:`inference.kalman.sampling`, with the factors given instead of factorised: a sample is
the composition of the affine maps ``z -> A z + b + S eps`` (``S`` the conditional's square root),
run by the covariance form's ``compose`` with zero covariance under either driver, and its
log-density follows from the noise, ``sum_t log N(eps_t; 0, I) - log |det S_t|``. No covariance
is formed and nothing is factorised, so a float32 chain whose covariances span many orders of
magnitude is sampled as accurately as its factors are known.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import Array

from .._algebra import DENSE
from .._types import SmootherResult
from ..sampling import sample_roots
from ._types import SqrtDynamics, SqrtEmissions, SqrtGaussian, SqrtLinearGaussian
from ._validate import canonicalize
from .filtering import run

_LOG_2PI = math.log(2.0 * math.pi)


def _logdet_root(S: Array) -> Array:
    """``log |det S|`` (``= 1/2 log det S S^T``) of any square root, triangular or not."""
    return jnp.linalg.slogdet(S)[1]


def _sample_one(key, initial: SqrtGaussian, conditionals: SqrtLinearGaussian, reverse, parallel):
    return sample_roots(key, DENSE, initial.mean, initial.chol, conditionals.A, conditionals.b,
                        conditionals.chol, _logdet_root, reverse, parallel, 1)  # fmt: skip


def sample_chain(
    key: Array,
    initial: SqrtGaussian,
    conditionals: SqrtLinearGaussian,
    *,
    reverse: bool = False,
    num_samples: int | None = None,
    parallel: bool = False,
) -> tuple[Array, Array]:
    """Sample a path ``z_{0:T-1}`` of a Gauss-Markov chain given by square roots, with its
    log-density; as :func:`inference.kalman.sample_chain` (the same arguments and results)."""
    one = partial(
        _sample_one,
        initial=initial,
        conditionals=conditionals,
        reverse=reverse,
        parallel=parallel,
    )
    if num_samples is None:
        return one(key)
    return jax.vmap(one)(jax.random.split(key, num_samples))


def _gauss_log_prob(x, mean, S):
    u = jnp.linalg.solve(S, x - mean)
    return -0.5 * u @ u - _logdet_root(S) - 0.5 * x.shape[-1] * _LOG_2PI


def chain_log_prob(
    initial: SqrtGaussian, conditionals: SqrtLinearGaussian, z: Array, *, reverse: bool = False
) -> Array:
    """Log-density of a path ``z`` ``(T, d)`` under a Gauss-Markov chain given by square roots."""
    prev, nxt = (z[1:], z[:-1]) if reverse else (z[:-1], z[1:])
    start = z[-1] if reverse else z[0]
    means = jnp.einsum("tij,tj->ti", conditionals.A, prev) + conditionals.b
    steps = jax.vmap(_gauss_log_prob)(nxt, means, conditionals.chol)
    return _gauss_log_prob(start, initial.mean, initial.chol) + jnp.sum(steps)


def _backward_sample(key, filtered: SqrtGaussian, backward, num_samples, parallel):
    last = SqrtGaussian(filtered.mean[-1], filtered.chol[-1])
    return sample_chain(
        key, last, backward, reverse=True, num_samples=num_samples, parallel=parallel
    )


def posterior_sample(
    key: Array, result: SmootherResult, *, num_samples: int | None = None, parallel: bool = False
) -> tuple[Array, Array]:
    """Draw from the exact smoothing posterior of a square-root :func:`smoother` result by
    backward sampling; returns ``(z, log_prob)``."""
    return _backward_sample(key, result.filtered.filtered, result.backward, num_samples, parallel)


def ffbs(
    key: Array,
    prior: SqrtGaussian,
    dynamics: SqrtDynamics,
    emissions: SqrtEmissions,
    *,
    num_samples: int | None = None,
    parallel: bool = False,
) -> tuple[Array, Array]:
    """Square-root forward-filtering backward-sampling (the filter emits the backward
    conditionals; no smoothing pass). Returns ``(z, log_prob)``."""
    c = canonicalize(prior, dynamics, emissions)
    filt, back = run(c, parallel=parallel, backward=True)
    return _backward_sample(key, filt.filtered, back, num_samples, parallel)
