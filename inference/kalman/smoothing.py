"""RTS smoothing, backward conditionals, smoothed (forward) dynamics and their expected KL.

Backward conditionals (the RTS elements; Särkkä & García-Fernández 2021, Lemma 10): from the
filtered belief ``N(m_t, P_t)`` and the dynamics ``(A_t, b_t, Q_t)``,

    q(z_t | z_{t+1}, o_{0:t}) = N(E_t z_{t+1} + g_t, L_t),
    E_t = P_t A_t^T (A_t P_t A_t^T + Q_t)^{-1},   g_t = m_t - E_t (A_t m_t + b_t),
    L_t = P_t - E_t Pp_{t+1} E_t^T                  (Pp_{t+1} = A_t P_t A_t^T + Q_t, predicted),

computed from one Cholesky factor ``Pp = C C^T`` of the stored predicted covariance:
``W = C^{-1} A_t P_t``, ``E_t = (C^{-T} W)^T``, ``L_t = P_t - W^T W`` (the form of the filter's
update, symmetric by construction); for diagonal structure ``L_t = P_t Q_t / Pp_{t+1}``, a
ratio of positives.

the VSSF posterior factorisation ``q(z_{T-1}|o) prod_t q(z_t | z_{t+1}, o_{0:t})`` (L-VSSF Eq. 4-5).
Composing these affine-Gaussian maps from the last filtered belief backwards gives the
smoothed beliefs; the composition ``compose`` is associative and drives both the smoother and
the samplers (with zero covariance it composes sampled affine maps).

Smoothed dynamics (VRKN Appendix A, the forward conditionals of the smoothing posterior):

    q(z_{t+1} | z_t, o_{0:T-1}) = N(M_t z_t + c_t, S_t),
    M_t = C_t^T Ps_t^{-1},  c_t = ms_{t+1} - M_t ms_t,  S_t = Ps_{t+1} - C_t^T Ps_t^{-1} C_t,

with the smoothed cross-covariance ``C_t = E_t Ps_{t+1}``. The covariance is computed without
cancellation as ``S_t = (I + Ps_{t+1} E_t^T L_t^{-1} E_t)^{-1} Ps_{t+1}`` (Woodbury; for diagonal
structure ``Ps_{t+1} L_t / Ps_t``, a ratio of positives).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import Array
from jax.scipy.linalg import solve_triangular

from . import _scan, step
from ._algebra import Algebra, algebra_for
from ._types import Dynamics, Emissions, FilterResult, Gaussian, LinearGaussian, SmootherResult
from ._validate import canonicalize
from .filtering import dynamics_per_step, run_filter


def compose(alg: Algebra, acc: LinearGaussian, elem: LinearGaussian) -> LinearGaussian:
    """Marginalise the middle variable of ``x -> y ~ acc`` then ``y -> z ~ elem``.

    ``z | x ~ N(E_e E_a x + E_e g_a + g_e, E_e L_a E_e^T + L_e)``: associative, so it serves
    ``lax.scan`` and ``lax.associative_scan`` alike.
    """
    Ea, ga, La = acc
    Ee, ge, Le = elem
    return LinearGaussian(
        alg.mm(Ee, Ea), alg.mv(Ee, ga) + ge, alg.sym(alg.mm(alg.mm(Ee, La), alg.T(Ee)) + Le)
    )


def compose_scan(alg: Algebra, elems: LinearGaussian, fields, parallel, reverse, unroll):
    """The ``fields`` of all prefix (suffix, ``reverse``) compositions of affine-Gaussian maps
    whose first (last) map has zero gain."""
    return _scan.scan(
        partial(compose, alg),
        elems,
        parallel=parallel,
        reverse=reverse,
        unroll=unroll,
        read=lambda e: tuple(getattr(e, f) for f in fields),
        rebuild=lambda f, like: like._replace(
            A=jnp.zeros_like(like.A), **dict(zip(fields, f, strict=True))
        ),
    )


def _backward_element(alg: Algebra, m, P, A, Q, m_pred, P_pred) -> LinearGaussian:
    """``q(z_t | z_{t+1}, o_{0:t})`` from the filtered and the predicted belief (module
    docstring): one Cholesky factorisation of ``P_pred`` and two triangular solves."""
    AP = alg.mm(A, P)
    if alg.diagonal:
        E, L = AP / P_pred, P * Q / P_pred
    else:
        C = jnp.linalg.cholesky(P_pred)
        W = solve_triangular(C, AP, lower=True)
        E = alg.T(solve_triangular(C, W, lower=True, trans=1))  # P A^T P_pred^{-1}
        L = alg.sym(P - alg.mm(alg.T(W), W))
    return LinearGaussian(E, m - alg.mv(E, m_pred), L)


def backward_conditionals(filtered: FilterResult | Gaussian, dynamics: Dynamics) -> LinearGaussian:
    """``q(z_t | z_{t+1}, o_{0:t})`` for ``t = 0..T-2`` from filtered beliefs and the dynamics.

    ``dynamics`` may be static or time-varying (leading axis ``T - 1``), as for the filter. A
    :class:`FilterResult` brings its predicted beliefs along; from filtered beliefs alone they
    are predicted here.
    """
    belief = filtered.filtered if isinstance(filtered, FilterResult) else filtered
    alg = algebra_for(belief.cov[0])
    stat = belief.cov.shape[1:]
    A, b, Q = dynamics
    A_ax, b_ax, Q_ax = (
        None if x is None or x.ndim == r else 0 for x, r in ((A, len(stat)), (b, 1), (Q, len(stat)))
    )
    now = Gaussian(belief.mean[:-1], belief.cov[:-1])
    if isinstance(filtered, FilterResult):
        pred = Gaussian(filtered.predicted.mean[1:], filtered.predicted.cov[1:])
    else:
        predict = lambda m, P, A, b, Q: step.predict(Gaussian(m, P), Dynamics(A, b, Q))  # noqa: E731
        pred = jax.vmap(predict, in_axes=(0, 0, A_ax, b_ax, Q_ax))(*now, A, b, Q)
    element = partial(_backward_element, alg)
    return jax.vmap(element, in_axes=(0, 0, A_ax, Q_ax, 0, 0))(*now, A, Q, *pred)


def _sequential_smoother(
    alg: Algebra, filtered: FilterResult, dynamics: Dynamics, unroll: int
) -> SmootherResult:
    """RTS smoothing as one reverse ``lax.scan``: each step forms the backward conditional
    from the stored filtered and predicted beliefs (:func:`_backward_element`, one
    factorisation of the predicted covariance) and composes it with the smoothed belief of the
    next step (:func:`compose`), emitting both and the cross-covariance ``E_t Ps_{t+1}``."""
    f, p = filtered.filtered, filtered.predicted
    A, _, Q = dynamics
    varying = dynamics_per_step(alg, dynamics)
    (A_xs, Q_xs), at = _scan.per_step((A, Q), (varying[0], varying[2]))

    def back(acc, inputs):
        m, P, m_pred, P_pred, dyn = inputs
        A_t, Q_t = at(dyn)
        elem = _backward_element(alg, m, P, A_t, Q_t, m_pred, P_pred)
        ms, Ps = acc
        new = compose(alg, LinearGaussian(jnp.zeros_like(Ps), ms, Ps), elem)
        return (new.b, new.Q), (new.b, new.Q, alg.mm(elem.A, Ps), elem)

    last = (f.mean[-1], f.cov[-1])
    xs = (f.mean[:-1], f.cov[:-1], p.mean[1:], p.cov[1:], (A_xs, Q_xs))
    _, (ms, Ps, cross, elems) = jax.lax.scan(back, last, xs, reverse=True, unroll=unroll)
    smoothed = Gaussian(
        *(jnp.concatenate([x, y[None]]) for x, y in zip((ms, Ps), last, strict=True))
    )
    return SmootherResult(filtered, smoothed, cross, elems)


def smooth_filtered(
    alg: Algebra, filtered: FilterResult, dynamics: Dynamics, *, parallel: bool, unroll: int
) -> SmootherResult:
    """RTS smoothing of a finished forward pass."""
    f = filtered.filtered
    back = backward_conditionals(filtered, dynamics)
    last = LinearGaussian(jnp.zeros_like(f.cov[-1]), f.mean[-1], f.cov[-1])
    elems = jax.tree.map(lambda x, y: jnp.concatenate([x, y[None]]), back, last)
    smoothed = Gaussian(*compose_scan(alg, elems, ("b", "Q"), parallel, True, unroll))
    cross = alg.mm(back.A, smoothed.cov[1:])
    return SmootherResult(filtered, smoothed, cross, back)


def smoother(
    prior: Gaussian,
    dynamics: Dynamics,
    emissions: Emissions,
    *,
    parallel: bool = False,
    unroll: int = 1,
) -> SmootherResult:
    """Kalman (RTS) smoother: filtered and smoothed beliefs, cross-covariances, backward
    conditionals and the marginal log-likelihood. Arguments as :func:`inference.kalman.filter`.

    Under ``jax.jit`` the outputs a caller does not use are dead code: XLA neither computes nor
    writes them (returning only what dynamax's smoother returns makes the dense sequential
    smoother 1.3x faster at d=32, ``benchmarks/README.md``).
    """
    alg, c = canonicalize(prior, dynamics, emissions)
    filtered = run_filter(alg, c, parallel=parallel, unroll=unroll)
    if not parallel:
        return _sequential_smoother(alg, filtered, c.dynamics, unroll)
    return smooth_filtered(alg, filtered, c.dynamics, parallel=parallel, unroll=unroll)


def smoothed_dynamics(result: SmootherResult) -> LinearGaussian:
    """Forward conditionals ``q(z_{t+1} | z_t, o_{0:T-1})`` for ``t = 0..T-2`` (VRKN Eq. 4)."""
    ms, Ps = result.smoothed
    alg = algebra_for(Ps[0])
    C = result.cross_cov
    M = alg.T(alg.solve_spd(Ps[:-1], C))  # C^T Ps_t^{-1}
    c = ms[1:] - alg.mv(M, ms[:-1])
    E, L = result.backward.A, result.backward.Q
    W = alg.mm(alg.T(E), alg.solve_spd(L, E))  # E^T L^{-1} E
    S = alg.shrink(Ps[1:], W)  # (I + Ps_{t+1} W)^{-1} Ps_{t+1}
    return LinearGaussian(M, c, S)


def expected_kl(result: SmootherResult, dynamics: Dynamics) -> Array:
    """``E_{z_t ~ q(z_t|o)} KL(q(z_{t+1} | z_t, o) || N(A_t z_t + b_t, Q_t))``, shape ``(T-1,)``.

    With ``q(z_{t+1}|z_t) = N(M z_t + c, S)`` and ``z_t ~ N(ms_t, Ps_t)``, the expected squared
    residual is ``V = S + (M - A) Ps_t (M - A)^T + r r^T`` with ``r = ms_{t+1} - A ms_t - b``, and

        E KL = 1/2 [tr(Q^{-1} V) - d + log det Q - log det S].

    This is the per-step KL of the VRKN smoothing bound (Eq. 4) for a linear model.
    """
    fwd = smoothed_dynamics(result)
    ms, Ps = result.smoothed
    alg = algebra_for(Ps[0])
    T, d = ms.shape
    stat = Ps.shape[1:]
    A, b, Q = dynamics
    A, Q = (jnp.broadcast_to(x, (T - 1, *stat)) for x in (A, Q))
    b = jnp.zeros((T - 1, d), ms.dtype) if b is None else jnp.broadcast_to(b, (T - 1, d))
    D = fwd.A - A
    r = ms[1:] - alg.mv(A, ms[:-1]) - b
    if alg.diagonal:
        V = fwd.Q + D * D * Ps[:-1] + r * r
        return 0.5 * jnp.sum(V / Q - 1.0 + jnp.log(Q) - jnp.log(fwd.Q), axis=-1)
    V = fwd.Q + D @ Ps[:-1] @ jnp.swapaxes(D, -1, -2) + r[..., :, None] * r[..., None, :]
    tr = jnp.trace(alg.solve_spd(Q, V), axis1=-2, axis2=-1)
    logdet = alg.logdet_spd(Q) - alg.logdet_spd(fwd.Q)
    return 0.5 * (tr - d + logdet)
