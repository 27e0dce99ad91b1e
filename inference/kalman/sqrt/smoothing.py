"""Square-root RTS smoothing, backward conditionals and smoothed dynamics, on Cholesky factors.

Backward conditionals ``q(z_t | z_{t+1}, o_{0:t}) = N(E_t z_{t+1} + g_t, Lb_t Lb_t^T)`` come
from one QR of the joint of ``(z_{t+1}, z_t)`` under the filtered belief
(:func:`.step.predict_and_reverse`; the sequential filter emits them from its scan).
Composing them from the last filtered belief backwards gives the smoothed beliefs. The
square-root composition of ``x -> y ~ (E_a, g_a, L_a)`` and ``y -> z ~ (E_e, g_e, L_e)`` is

    z | x ~ N(E_e E_a x + E_e g_a + g_e, L L^T),    L = tria([E_e L_a, L_e]),

associative, so it serves ``lax.scan`` and ``lax.associative_scan`` alike (Yaghoobi et al.
2022, Sec. 4; the covariance form's ``compose`` with ``E L E^T + L`` replaced by a QR).

Smoothed dynamics (VRKN Appendix A) ``q(z_{t+1} | z_t, o_{0:T-1}) = N(M_t z_t + c_t, S_t S_t^T)``
are the same joint read the other way round: with ``z_{t+1} ~ N(ms_{t+1}, Ls_{t+1} Ls_{t+1}^T)``
and ``z_t | z_{t+1}`` the backward conditional, :func:`.step.joint` gives ``(Ls_t, G, S_t)``
with ``M_t = G Ls_t^{-1}``, ``c_t = ms_{t+1} - M_t ms_t``: no covariance is subtracted anywhere.
The lag-one cross-covariances ``Cov(z_t, z_{t+1}) = E_t Ls_{t+1} Ls_{t+1}^T`` are returned as
matrices (as the covariance form returns them: a cross-covariance has no Cholesky factor).
"""

import jax
import jax.numpy as jnp

from .. import _scan
from .._types import FilterResult, SmootherResult
from . import step
from ._types import SqrtDynamics, SqrtEmissions, SqrtGaussian, SqrtLinearGaussian
from ._validate import canonicalize, time_varying_dynamics
from .filtering import run


def compose(acc: SqrtLinearGaussian, elem: SqrtLinearGaussian) -> SqrtLinearGaussian:
    """Marginalise the middle variable of ``x -> y ~ acc`` then ``y -> z ~ elem``."""
    Ea, ga, La = acc
    Ee, ge, Le = elem
    gb = jnp.einsum("...ij,...j->...i", Ee, ga) + ge
    return SqrtLinearGaussian(Ee @ Ea, gb, step.tria(jnp.concatenate([Ee @ La, Le], axis=-1)))


def backward_conditionals(
    filtered: FilterResult | SqrtGaussian, dynamics: SqrtDynamics
) -> SqrtLinearGaussian:
    """``q(z_t | z_{t+1}, o_{0:t})`` for ``t = 0..T-2`` from filtered beliefs (a
    :class:`~inference.kalman.FilterResult` of the square-root filter or its
    :class:`SqrtGaussian` s) and the dynamics ``(A, b, L_Q)``, static or time-varying."""
    belief = filtered.filtered if isinstance(filtered, FilterResult) else filtered
    T, d = belief.mean.shape
    now = jax.tree.map(lambda x: x[:-1], belief)
    dyn = time_varying_dynamics(dynamics, d, T, belief.mean.dtype)
    return jax.vmap(step.predict_and_reverse)(now, dyn)[1]


def smooth_filtered(
    filtered: FilterResult, backward: SqrtLinearGaussian, *, parallel: bool, unroll: int = 1
) -> SmootherResult:
    """Square-root RTS smoothing of a finished forward pass and its backward conditionals."""
    f = filtered.filtered
    last = SqrtLinearGaussian(jnp.zeros_like(f.chol[-1]), f.mean[-1], f.chol[-1])
    elems = jax.tree.map(lambda x, y: jnp.concatenate([x, y[None]]), backward, last)
    mean, chol = _scan.scan(
        compose,
        elems,
        parallel=parallel,
        reverse=True,
        unroll=unroll,
        read=lambda e: (e.b, e.chol),
        rebuild=lambda fields, like: SqrtLinearGaussian(jnp.zeros_like(like.A), *fields),
    )
    Ls = chol[1:]
    cross = backward.A @ Ls @ jnp.swapaxes(Ls, -1, -2)  # E_t Ps_{t+1}
    return SmootherResult(filtered, SqrtGaussian(mean, chol), cross, backward)


def smoother(
    prior: SqrtGaussian,
    dynamics: SqrtDynamics,
    emissions: SqrtEmissions,
    *,
    parallel: bool = False,
    unroll: int = 1,
) -> SmootherResult:
    """Square-root Kalman (RTS) smoother: filtered and smoothed beliefs as lower Cholesky
    factors, cross-covariances (matrices), backward conditionals (:class:`SqrtLinearGaussian`)
    and the marginal log-likelihood. Arguments as :func:`inference.kalman.sqrt.filter`;
    :func:`inference.kalman.sqrt.from_sqrt` turns the result into the covariance form's."""
    c = canonicalize(prior, dynamics, emissions)
    filtered, backward = run(c, parallel=parallel, backward=True, unroll=unroll)
    return smooth_filtered(filtered, backward, parallel=parallel, unroll=unroll)


def _forward_conditional(ms_now, ms_next, Ls_next, E, Lb):
    Ls_now, G, S = step.joint(Ls_next, E, Lb)
    M = step.gain(Ls_now, G)
    return SqrtLinearGaussian(M, ms_next - M @ ms_now, S)


def smoothed_dynamics(result: SmootherResult) -> SqrtLinearGaussian:
    """Forward conditionals ``q(z_{t+1} | z_t, o_{0:T-1})`` for ``t = 0..T-2`` (VRKN Eq. 4), with
    lower Cholesky factors of their covariances, from a square-root :func:`smoother` result."""
    ms, Ls = result.smoothed
    back = result.backward
    return jax.vmap(_forward_conditional)(ms[:-1], ms[1:], Ls[1:], back.A, back.chol)
