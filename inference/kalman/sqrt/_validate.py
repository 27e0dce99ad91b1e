"""Shape and value checks of a square-root model, and its normalisation into the kernels' form.

As in :mod:`inference.kalman._validate` (whose shape helpers this reuses): shapes are checked
always, values whenever the arrays are concrete (outside ``jit``) and, under a trace, staged for
:func:`inference.kalman.checked`; errors are ``ValueError`` s naming the argument. A square
root must be finite and nonsingular (so that ``S S^T`` is positive definite); it need not be
triangular.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .._types import Emissions, Gaussian, LinearGaussian
from .._validate import (
    _check_finite,
    _concrete,
    _given_mask,
    _shape_error,
    _staged_check,
    _time_varying,
)
from ._types import SqrtDynamics, SqrtEmissions, SqrtGaussian
from .step import decouple


class SqrtCanonical(NamedTuple):
    """Every parameter time-varying, masked rows decoupled (:func:`step.decouple`):
    ``w (T, p)``, ``H (T, p, d)``, ``LR (T, p, p)``, ``num_observed (T,)``, dynamics ``T - 1``."""

    prior: SqrtGaussian
    dynamics: SqrtDynamics
    w: Array
    H: Array
    LR: Array
    num_observed: Array


def _check_root(name: str, S: Array) -> None:
    """Finite and nonsingular; under a trace staged for :func:`inference.kalman.checked`."""
    _check_finite(name, S)
    message = f"{name} must be nonsingular (a square root of a positive definite matrix)"
    if np.size(S) == 0:
        return
    if not _concrete(S):
        _staged_check(jnp.isfinite(jnp.linalg.slogdet(S)[1]), message)
        return
    smallest = np.linalg.svd(np.asarray(S, np.float64), compute_uv=False)[..., -1]
    if np.any(smallest <= 0):
        raise ValueError(message)


def time_varying_dynamics(dynamics: SqrtDynamics, d: int, T: int, dtype) -> SqrtDynamics:
    """``(A, b, L_Q)`` with a leading axis ``T - 1`` (static ones broadcast, ``b = None`` zero)."""
    A, b, LQ = (None if x is None else jnp.asarray(x) for x in dynamics)
    A = _time_varying("A", A.astype(dtype), (d, d), T - 1)
    LQ = _time_varying("Q square root", LQ.astype(dtype), (d, d), T - 1)
    b = jnp.zeros((T - 1, d), dtype) if b is None else b.astype(dtype)
    return SqrtDynamics(A, _time_varying("b", b, (d,), T - 1), LQ)


def _not_covariance_form(prior, dynamics, emissions) -> None:
    """The containers are NamedTuples of the same arity as the covariance form's: passing a
    covariance where a square root is expected would run silently and be wrong."""
    for name, x, cls in [
        ("prior", prior, Gaussian),
        ("dynamics", dynamics, LinearGaussian),
        ("emissions", emissions, Emissions),
    ]:
        if isinstance(x, cls):
            raise TypeError(
                f"{name} is a covariance-form kalman.{cls.__name__}; the square-root kernels "
                "take square roots of the covariances: convert with kalman.sqrt.to_sqrt"
            )


def canonicalize(
    prior: SqrtGaussian, dynamics: SqrtDynamics, emissions: SqrtEmissions
) -> SqrtCanonical:
    """Check a square-root model and bring it into :class:`SqrtCanonical` form."""
    _not_covariance_form(prior, dynamics, emissions)
    m0, L0 = (jnp.asarray(x) for x in prior)
    A, b, LQ = (None if x is None else jnp.asarray(x) for x in dynamics)
    w, LR = jnp.asarray(emissions.w), jnp.asarray(emissions.chol)
    H = None if emissions.H is None else jnp.asarray(emissions.H)
    dtype = jnp.result_type(float, *[x for x in (m0, L0, A, b, LQ, w, LR, H) if x is not None])
    m0, L0, w, LR = (x.astype(dtype) for x in (m0, L0, w, LR))
    if m0.ndim != 1:
        raise _shape_error("prior mean m0", m0.shape, "(d,)")
    d = m0.shape[0]
    if L0.shape != (d, d):
        raise _shape_error(
            "prior square root", L0.shape, f"({d}, {d}) (the square-root form is dense)"
        )
    if w.ndim != 2:
        raise _shape_error("w", w.shape, "(T, p)")
    T, p = w.shape
    if T < 1:
        raise ValueError("w must have at least one time step")
    A, b, LQ = time_varying_dynamics(SqrtDynamics(A, b, LQ), d, T, dtype)
    if H is None:
        if p != d:
            raise ValueError(f"H is None (identity) but w has {p} columns and the state {d}")
        H = jnp.eye(d, dtype=dtype)
    H = _time_varying("H", H.astype(dtype), (p, d), T)
    LR = _time_varying("R square root", LR, (p, p), T)
    for name, x in [("prior mean m0", m0), ("A", A), ("b", b), ("H", H)]:
        _check_finite(name, x)
    for name, x in [("prior square root", L0), ("Q square root", LQ), ("R square root", LR)]:
        _check_root(name, x)
    if emissions.mask is None:
        _check_finite("w (where observed)", w)
        num_observed = jnp.full((T,), p, dtype)
    else:
        seen = jnp.broadcast_to(_given_mask(emissions.mask, w, dtype), w.shape) > 0
        _check_finite("w (where observed)", jnp.where(seen, w, 0.0))
        w, H, LR = jax.vmap(decouple)(w, H, LR, seen)
        num_observed = jnp.sum(seen, axis=-1).astype(dtype)
    return SqrtCanonical(SqrtGaussian(m0, L0), SqrtDynamics(A, b, LQ), w, H, LR, num_observed)
