"""Square-root containers and their conversion to and from covariance form.

A *square root* of a covariance ``Sigma`` is any matrix ``S`` with ``S S^T = Sigma``. The
kernels return lower-triangular Cholesky factors with a non-negative diagonal; what the user
passes may be any square ``(d, d)`` square root (a Cholesky factor, the elementwise square root
of a diagonal matrix, ``U diag(sqrt(lambda))`` of an eigendecomposition), because a square root
only ever enters the kernels through products ``S S^T`` formed inside a QR factorisation.

Time-axis convention, masks and multi-sensor stacking are those of the covariance form
(:mod:`inference.kalman._types`); results come in the covariance form's containers
(:class:`~inference.kalman.FilterResult`, :class:`~inference.kalman.SmootherResult`) holding
:class:`SqrtGaussian` / :class:`SqrtLinearGaussian` where those hold covariances.
"""

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import Array

from .._types import Emissions, FilterResult, Gaussian, LinearGaussian, SmootherResult
from .._validate import stack_sensors as _stack_covariance_sensors


class SqrtGaussian(NamedTuple):
    """``N(mean, chol chol^T)``; ``chol`` has shape ``(..., d, d)``."""

    mean: Array
    chol: Array


class SqrtLinearGaussian(NamedTuple):
    """``x' | x ~ N(A x + b, chol chol^T)``: dynamics, backward conditionals, smoothed dynamics."""

    A: Array
    b: Array
    chol: Array


SqrtDynamics = SqrtLinearGaussian


class SqrtEmissions(NamedTuple):
    """:class:`~inference.kalman.Emissions` with a square root ``chol`` of the noise ``R``
    (same shapes: ``(p, p)`` static or ``(T, p, p)``; block-diagonal for stacked sensors)."""

    w: Array
    chol: Array
    mask: Array | None = None
    H: Array | None = None


def _gram(S: Array) -> Array:
    return S @ jnp.swapaxes(S, -1, -2)


def to_sqrt(x: Any) -> Any:
    """Covariance form -> square-root form by Cholesky factorisation: a :class:`Gaussian`,
    :class:`LinearGaussian` or :class:`Emissions` (float64 or a well-conditioned covariance:
    the factorisation of an ill-conditioned float32 covariance is what this form avoids)."""
    if isinstance(x, Gaussian):
        return SqrtGaussian(x.mean, jnp.linalg.cholesky(x.cov))
    if isinstance(x, LinearGaussian):
        return SqrtLinearGaussian(x.A, x.b, jnp.linalg.cholesky(x.Q))
    if isinstance(x, Emissions):
        return SqrtEmissions(x.w, jnp.linalg.cholesky(x.R), x.mask, x.H)
    raise TypeError(f"to_sqrt takes a Gaussian, LinearGaussian or Emissions, got {type(x)}")


def from_sqrt(x: Any) -> Any:
    """Square-root form -> covariance form (``S S^T``): a :class:`SqrtGaussian`,
    :class:`SqrtLinearGaussian`, :class:`SqrtEmissions`, or a whole
    :class:`~inference.kalman.FilterResult` / :class:`~inference.kalman.SmootherResult` of the
    square-root kernels, which then equals the covariance kernels' result."""
    if isinstance(x, SqrtGaussian):
        return Gaussian(x.mean, _gram(x.chol))
    if isinstance(x, SqrtLinearGaussian):
        return LinearGaussian(x.A, x.b, _gram(x.chol))
    if isinstance(x, SqrtEmissions):
        return Emissions(x.w, _gram(x.chol), x.mask, x.H)
    if isinstance(x, FilterResult):
        return FilterResult(from_sqrt(x.predicted), from_sqrt(x.filtered), *x[2:])
    if isinstance(x, SmootherResult):
        return SmootherResult(
            from_sqrt(x.filtered), from_sqrt(x.smoothed), x.cross_cov, from_sqrt(x.backward)
        )
    raise TypeError(f"from_sqrt takes a square-root container or result, got {type(x)}")


def stack_sensors(sensors: list[SqrtEmissions]) -> SqrtEmissions:
    """:func:`inference.kalman.stack_sensors` for square roots: a block-diagonal matrix of
    square roots is a square root of the block-diagonal noise."""
    stacked = _stack_covariance_sensors([Emissions(*s) for s in sensors])
    return SqrtEmissions(*stacked)
