"""Extended Kalman filtering and smoothing with a learned linearisation, and the EKVAE's bound
on ``log p(a)``: Klushyn et al. (2021), "Latent Matters: Learning Deep State-Space Models",
NeurIPS, Sec. 4.1-4.3 and App. A.5-A.6 (equation numbers are the paper's). Used by
:mod:`pssm.ekvae`; time conventions of :mod:`pssm.core` (steps ``t = 0..T-1``).

**Filter and smoother** (App. A.5). A transition ``(z, u) -> (F, B, Q)`` (e.g.
:class:`pssm.ekvae.NeuralLinearisation`) stands in for the Jacobian of the unknown dynamics: the
prediction step uses the linearisation *at the filtered mean*,

    [F_t, B_t, Q_t] = [F, B, Q](m_t, u_t),
    m_{t+1}^- = F_t m_t + B_t u_t,   P_{t+1}^- = F_t P_t F_t^T + Q_t,

and the update step is the exact Kalman update with the linear ``p(a_t | z_t) = N(H z_t, R)``.
With the dynamics fixed at those points the model is a time-varying LGSSM whose Kalman filter
*is* the EKF, and whose dense RTS smoother (:func:`inference.kalman.smoother`; here composed
from the EKF's beliefs by :func:`extended_kalman_smoother`) is the extended smoother. One step
of the filter is :func:`ekf_update` then :func:`ekf_predict`: the filter scans them and the
EKVAE's online belief step (``pssm.ekvae``, ``model.belief_step``) calls them.

**Bound** (Eqs. 16-18, ``smoother`` version; the ``filter`` version of App. A.6 replaces the
smoothed marginals ``q_t`` by the filtered ``f_t`` and its log-ratio term vanishes):

    L(a) = E_{q_0}[log p(a_0 | z_0) + log p(z_0) - log q_0(z_0)]                     (Eq. 18)
         + sum_{t>=1} E_{q_{t-1}}[log p(a_t | z_{t-1}, u_{t-1}) + log f_{t-1}(z_{t-1})
                                  - log q_{t-1}(z_{t-1})]                             (Eq. 17)
    p(a_t | z_{t-1}, u) = N(H (F z_{t-1} + B u), H Q H^T + R)  (z_t integrated out in closed form)

with ``[F, B, Q]`` evaluated at the *sample* ``z_{t-1}`` (so the transition network is trained on
samples, not only at the filtered means, Sec. 4.3). Each ``t >= 1`` term is the Jensen bound of
Eq. 16 on ``log p(a_t | a_{0:t-1})`` with the filtered distribution ``f_{t-1}`` standing in for
``p(z_{t-1} | a_{0:t-1})``: exact for a linear model, whose gap is then
``KL(q_{t-1} || p(z_{t-1} | a_{0:t}))`` (checked in ``tests/test_ekvae.py``); for the nonlinear
model ``f_{t-1}`` is the EKF approximation (Sec. 4.2: "generally not optimal"). ``log p(z_0)``
may be replaced by a lower bound (the VHP's ``F_VHP``). A missing ``a_t`` (mask false) skips its
Kalman update and drops its terms.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from inference import kalman

_LOG_2PI = math.log(2.0 * math.pi)
Transition = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array | None, jax.Array]]


class EKFResult(NamedTuple):
    """Output of :func:`extended_kalman_filter` (one sequence).

    Attributes:
        predicted: ``p(z_t | a_{0:t-1})``, ``(T, d)`` means and ``(T, d, d)`` covariances.
        filtered: ``p(z_t | a_{0:t})``.
        dynamics: ``(F_t, B_t u_t, Q_t)`` at the filtered means, leading axis ``T - 1``: the
            linearised LGSSM (its Kalman filter reproduces ``filtered``).
        log_likelihoods: ``log N(a_t; H m_t^-, H P_t^- H^T + R)`` per step (0 where missing).
    """

    predicted: kalman.Gaussian
    filtered: kalman.Gaussian
    dynamics: kalman.Dynamics
    log_likelihoods: jax.Array


def apply_transition(transition: Transition, z, u):
    """``(F, b = B u, F z + b, Q)`` of ``p(z' | z, u)`` (batched over leading axes)."""
    F, B, Q = transition(z, u)
    b = jnp.zeros_like(z) if B is None else jnp.einsum("...ij,...j->...i", B, u)
    return F, b, jnp.einsum("...ij,...j->...i", F, z) + b, Q


def _logdet(L):
    """``log det(L L^T)`` of a Cholesky factor."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)


def extended_kalman_filter(
    transition: Transition,
    prior: kalman.Gaussian,
    H: jax.Array,
    R: jax.Array,
    a: jax.Array,
    actions: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> EKFResult:
    """EKF with neural linearisation at the filtered means (module docstring), one sequence.

    Args:
        transition: ``(z, u) -> (F, B, Q)`` (e.g. a :class:`NeuralLinearisation`, registered).
        prior: dense ``N(m0, P0)`` of ``z_0``.
        H, R: ``(p_a, d)`` and ``(p_a, p_a)`` of ``a_t ~ N(H z_t, R)``.
        a: ``(T, p_a)`` pseudo-observations.
        actions: ``(T, u)`` or ``None``; ``actions[t]`` drives ``z_t -> z_{t+1}``.
        mask: ``(T,)``, false where ``a_t`` is missing (a pure prediction step).
    """
    T = a.shape[0]
    mask = jnp.ones(T, bool) if mask is None else jnp.asarray(mask).astype(bool)
    u = jnp.zeros((T, 0), a.dtype) if actions is None else actions

    def step(pred, xs):
        a_t, m_t, u_t = xs
        filt, ll = ekf_update(pred, a_t, H, R, m_t)
        nxt, dyn = ekf_predict(transition, filt, None if actions is None else u_t)
        return nxt, (pred, filt, *dyn, ll)

    _, (pred, filt, F, b, Q, lls) = jax.lax.scan(step, prior, (a, mask, u))
    return EKFResult(pred, filt, kalman.Dynamics(F[:-1], b[:-1], Q[:-1]), lls)


def ekf_update(belief: kalman.Gaussian, a_t, H, R, mask_t=None):
    """The EKF's update on one ``a_t ~ N(H z_t, R)`` (one belief ``(d,), (d, d)``): the exact
    Kalman update :func:`inference.kalman.update`; a missing ``a_t`` (``mask_t`` false) leaves
    the belief unchanged with log-likelihood 0. Returns ``(filtered, log-likelihood)``."""
    return kalman.update(belief, a_t, R, mask=mask_t, H=H)


def ekf_predict(transition: Transition, belief: kalman.Gaussian, u_t=None):
    """The EKF's prediction (one belief): ``[F, B, Q]`` at the filtered mean (and ``u_t``),
    then :func:`inference.kalman.predict`, ``N(F m + B u, F P F^T + Q)``. Returns
    ``(predicted, kalman.Dynamics(F, B u, Q))``."""
    F, b, _, Q = apply_transition(transition, belief.mean, u_t)
    dynamics = kalman.Dynamics(F, b, Q)
    return kalman.predict(belief, dynamics), dynamics


def extended_kalman_smoother(ekf: EKFResult) -> kalman.Gaussian:
    """RTS smoothing of an EKF run with its linearised dynamics: the backward conditionals
    ``q(z_t | z_{t+1}, a_{0:t}) = N(E_t z_{t+1} + g_t, L_t)`` of :func:`inference.kalman.
    backward_conditionals`, composed from the last filtered belief backwards. Equals
    :func:`inference.kalman.smoother` on the linearised LGSSM, without filtering again."""
    back = kalman.backward_conditionals(ekf.filtered, ekf.dynamics)

    def step(nxt, el):
        E, g, L = el
        cov = E @ nxt.cov @ E.T + L
        cur = kalman.Gaussian(E @ nxt.mean + g, 0.5 * (cov + cov.T))
        return cur, cur

    last = kalman.Gaussian(ekf.filtered.mean[-1], ekf.filtered.cov[-1])
    _, earlier = jax.lax.scan(step, last, back, reverse=True)
    return jax.tree.map(lambda e, x: jnp.concatenate([e, x[None]]), earlier, last)


def _logpdf(x, mean, cov):
    """``log N(x; mean, cov)`` over the last axis (batched)."""
    L = jnp.linalg.cholesky(cov)
    r = jax.scipy.linalg.solve_triangular(L, (x - mean)[..., None], lower=True)[..., 0]
    return -0.5 * (jnp.sum(r * r, -1) + _logdet(L) + x.shape[-1] * _LOG_2PI)


def _kl(m1, P1, m2, P2):
    """``KL(N(m1, P1) || N(m2, P2))`` (batched): ``tr(P2^-1 P1) = ||L2^-1 L1||_F^2``."""
    L1, L2 = jnp.linalg.cholesky(P1), jnp.linalg.cholesky(P2)
    M = jax.scipy.linalg.solve_triangular(L2, L1, lower=True)
    r = jax.scipy.linalg.solve_triangular(L2, (m2 - m1)[..., None], lower=True)[..., 0]
    d = m1.shape[-1]
    return 0.5 * (jnp.sum(M * M, (-2, -1)) + jnp.sum(r * r, -1) - d + _logdet(L2) - _logdet(L1))


def _entropy(P):
    return 0.5 * (_logdet(jnp.linalg.cholesky(P)) + P.shape[-1] * (1.0 + _LOG_2PI))


def auxiliary_bound(
    key: jax.Array,
    transition: Transition,
    prior: kalman.Gaussian,
    H: jax.Array,
    R: jax.Array,
    a: jax.Array,
    actions: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    posterior: str = "smoother",
    log_prior: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    analytic: bool = True,
) -> dict:
    """One-sample estimate of ``L(a) <= log p(a_{0:T-1})`` (module docstring), one sequence.

    Args:
        key: PRNG key (the ``z`` samples, and ``log_prior``'s).
        transition, prior, H, R, a, actions, mask: as :func:`extended_kalman_filter`.
        posterior: ``"smoother"`` (``q_t = p(z_t | a_{0:T-1})``) or ``"filter"``
            (``q_t = f_t``).
        log_prior: ``(key, z_0) -> log p(z_0)`` or a lower bound of it (the VHP); ``None``:
            the Gaussian ``prior``.
        analytic: closed-form KLs and entropies where they exist.

    Returns:
        ``{"bound": scalar, "initial": scalar, "transition": (T-1,) log p(a_t | z_{t-1}) terms,
        "posterior_kl": (T-1,) log q - log f terms, "z": (T, d) the sample of q}`` (masked
        terms are 0).
    """
    if posterior not in ("smoother", "filter"):
        raise ValueError(f"posterior must be 'smoother' or 'filter', got {posterior!r}")
    T = a.shape[0]
    mask = jnp.ones(T, bool) if mask is None else jnp.asarray(mask).astype(bool)
    ekf = extended_kalman_filter(transition, prior, H, R, a, actions, mask)
    f = ekf.filtered
    q = extended_kalman_smoother(ekf) if posterior == "smoother" else f
    k_z, k_prior = jax.random.split(key)
    eps = jax.random.normal(k_z, q.mean.shape, q.mean.dtype)
    z = q.mean + jnp.einsum("tij,tj->ti", jnp.linalg.cholesky(q.cov), eps)
    # initial term (Eq. 18)
    z0, q0 = z[0], kalman.Gaussian(q.mean[0], q.cov[0])
    initial = _logpdf(a[0], H @ z0, R)
    if log_prior is None and analytic:
        initial = initial - _kl(q0.mean, q0.cov, prior.mean, prior.cov)
    else:
        log_p0 = _logpdf(z0, *prior) if log_prior is None else log_prior(k_prior, z0)
        neg_log_q0 = _entropy(q0.cov) if analytic else -_logpdf(z0, *q0)
        initial = initial + log_p0 + neg_log_q0
    # transition terms (Eqs. 16-17)
    u_prev = None if actions is None else actions[:-1]
    F, b, mean, Q = apply_transition(transition, z[:-1], u_prev)
    HQH = jnp.einsum("ij,tjk,lk->til", H, Q, H) + R
    trans = _logpdf(a[1:], jnp.einsum("ij,tj->ti", H, mean), HQH)
    if posterior == "filter":
        ratio = jnp.zeros(T - 1, a.dtype)
    elif analytic:
        ratio = _kl(q.mean[:-1], q.cov[:-1], f.mean[:-1], f.cov[:-1])
    else:
        z_prev = z[:-1]
        ratio = _logpdf(z_prev, q.mean[:-1], q.cov[:-1]) - _logpdf(z_prev, f.mean[:-1], f.cov[:-1])
    initial = jnp.where(mask[0], initial, 0.0)
    trans, ratio = jnp.where(mask[1:], trans, 0.0), jnp.where(mask[1:], ratio, 0.0)
    bound = initial + jnp.sum(trans - ratio)
    return {"bound": bound, "initial": initial, "transition": trans, "posterior_kl": ratio,
            "z": z}  # fmt: skip
