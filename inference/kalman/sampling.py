"""Sampling and scoring Gauss-Markov chains: FFBS, smoothed-dynamics paths, path log-densities.

A chain is an initial Gaussian and affine-Gaussian conditionals, run forward
(``z_{t+1} | z_t``, the smoothed dynamics) or in reverse (``z_t | z_{t+1}``, the backward
conditionals of forward-filtering backward-sampling, L-VSSF Eq. 4-5). A sample is the
composition of the affine maps ``z -> A z + b + Q^{1/2} eps``: the same ``compose`` kernel
as the smoother, under either driver. The log-density of the sample follows from the noise:
``sum_t log N(eps_t; 0, I) - log det Q_t^{1/2}``.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import Array

from ._algebra import algebra_for
from ._types import Dynamics, Emissions, Gaussian, LinearGaussian, SmootherResult
from ._validate import canonicalize
from .filtering import run_filter
from .smoothing import backward_conditionals, compose_scan

_LOG_2PI = math.log(2.0 * math.pi)


def _logdet_sqrt(alg, sqrt_cov: Array) -> Array:
    diag = sqrt_cov if alg.diagonal else jnp.diagonal(sqrt_cov, axis1=-2, axis2=-1)
    return jnp.sum(jnp.log(diag), axis=-1)


def sample_roots(key, alg, mean0, s0, A, b, s, logdet, reverse, parallel, unroll):
    """One path of the chain ``z_0 = mean0 + s0 eps_0``, ``z -> A_t z + b_t + s_t eps_t`` given
    square roots ``s0``, ``s_t`` of its covariances (``logdet(s) = log |det s|``; reversed:
    ``mean0, s0`` belong to ``z_{T-1}``), composed under ``compose_scan``; returns the path and
    its log-density. The covariance form factorises its covariances into these roots, the
    square-root form (:mod:`inference.kalman.sqrt`) passes its factors."""
    T = b.shape[0] + 1
    d = mean0.shape[-1]
    eps = jax.random.normal(key, (T, d), mean0.dtype)
    e0, e_rest = (eps[-1], eps[:-1]) if reverse else (eps[0], eps[1:])
    z0 = mean0 + alg.mv(s0, e0)
    first = LinearGaussian(jnp.zeros_like(s0), z0, jnp.zeros_like(s0))
    maps = LinearGaussian(A, b + alg.mv(s, e_rest), jnp.zeros_like(s))
    cat = (
        (lambda r, f: jnp.concatenate([r, f[None]]))
        if reverse
        else (lambda r, f: jnp.concatenate([f[None], r]))
    )
    elems = jax.tree.map(cat, maps, first)
    (z,) = compose_scan(alg, elems, ("b",), parallel, reverse, unroll)
    log_prob = -0.5 * jnp.sum(eps * eps) - 0.5 * T * d * _LOG_2PI - logdet(s0) - jnp.sum(logdet(s))
    return z, log_prob


def _sample_one(key, initial: Gaussian, conditionals: LinearGaussian, reverse, parallel, unroll):
    alg = algebra_for(initial.cov)
    s0, s = alg.sqrt(initial.cov), alg.sqrt(conditionals.Q)
    return sample_roots(key, alg, initial.mean, s0, conditionals.A, conditionals.b, s,
                        partial(_logdet_sqrt, alg), reverse, parallel, unroll)  # fmt: skip


def sample_chain(
    key: Array,
    initial: Gaussian,
    conditionals: LinearGaussian,
    *,
    reverse: bool = False,
    num_samples: int | None = None,
    parallel: bool = False,
    unroll: int = 1,
) -> tuple[Array, Array]:
    """Sample a path ``z_{0:T-1}`` of a Gauss-Markov chain and return its log-density.

    Args:
        key: PRNG key.
        initial: distribution of ``z_0`` (forward) or of ``z_{T-1}`` (``reverse=True``).
        conditionals: ``z_{t+1} | z_t`` (forward) or ``z_t | z_{t+1}`` (reverse) for
            ``t = 0..T-2``, leading axis ``T - 1``.
        reverse: sample from the last step backwards (FFBS).
        num_samples: draw this many independent paths (a leading sample axis); ``None`` for one.
        parallel: compose the affine maps with ``lax.associative_scan``.
        unroll: loop unrolling of the sequential driver.

    Returns:
        ``(z, log_prob)``: paths ``(..., T, d)`` and their log-densities ``(...)``.
    """
    one = partial(
        _sample_one,
        initial=initial,
        conditionals=conditionals,
        reverse=reverse,
        parallel=parallel,
        unroll=unroll,
    )
    if num_samples is None:
        return one(key)
    return jax.vmap(one)(jax.random.split(key, num_samples))


def _gauss_log_prob(alg, x, mean, cov):
    r = x - mean
    sqrt = alg.sqrt(cov)
    if alg.diagonal:
        u = r / sqrt
    else:
        u = jax.scipy.linalg.solve_triangular(sqrt, r[..., None], lower=True)[..., 0]
    return -0.5 * jnp.sum(u * u, -1) - _logdet_sqrt(alg, sqrt) - 0.5 * x.shape[-1] * _LOG_2PI


def chain_log_prob(
    initial: Gaussian, conditionals: LinearGaussian, z: Array, *, reverse: bool = False
) -> Array:
    """Log-density of a path ``z`` of shape ``(T, d)`` under a Gauss-Markov chain."""
    alg = algebra_for(initial.cov)
    prev, nxt = (z[1:], z[:-1]) if reverse else (z[:-1], z[1:])
    start = z[-1] if reverse else z[0]
    means = jax.vmap(alg.mv)(conditionals.A, prev) + conditionals.b
    steps = jax.vmap(partial(_gauss_log_prob, alg))(nxt, means, conditionals.Q)
    return _gauss_log_prob(alg, start, initial.mean, initial.cov) + jnp.sum(steps)


def posterior_sample(
    key: Array,
    result: SmootherResult,
    *,
    num_samples: int | None = None,
    parallel: bool = False,
) -> tuple[Array, Array]:
    """Draw from the exact smoothing posterior by backward sampling, with log-densities."""
    return _backward_sample(key, result.filtered.filtered, result.backward, num_samples, parallel)


def _backward_sample(key, filtered: Gaussian, backward: LinearGaussian, num_samples, parallel):
    last = Gaussian(filtered.mean[-1], filtered.cov[-1])
    return sample_chain(
        key, last, backward, reverse=True, num_samples=num_samples, parallel=parallel
    )


def ffbs(
    key: Array,
    prior: Gaussian,
    dynamics: Dynamics,
    emissions: Emissions,
    *,
    num_samples: int | None = None,
    parallel: bool = False,
) -> tuple[Array, Array]:
    """Forward-filtering backward-sampling: filter, then sample ``z_{T-1}`` and go backwards
    through ``q(z_t | z_{t+1}, o_{0:t})``; no smoothing pass is needed. Returns ``(z, log_prob)``.
    """
    alg, c = canonicalize(prior, dynamics, emissions)
    filt = run_filter(alg, c, parallel=parallel, unroll=1)
    back = backward_conditionals(filt, c.dynamics)
    return _backward_sample(key, filt.filtered, back, num_samples, parallel)
