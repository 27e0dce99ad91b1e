"""Kalman filter as an associative scan over conditional elements.

Each step ``t`` becomes an element ``(A, b, C, eta, J)`` (Särkkä & García-Fernández 2021, Lemma 7)
describing

    p(z_t | z_{t-1}, o_t) = N(A z_{t-1} + b, C)      and      p(o_t | z_{t-1}) ∝ N_info(eta, J),

where the observations of step ``t`` enter only through their latent-space information

    J_t^obs = sum_k H_k^T R_k^{-1} H_k,          h_t^obs = sum_k H_k^T R_k^{-1} w_k

(missing sensors contribute nothing), so fusing several sensors is a sum and cannot depend on
their order (VRKN paper, "Sensor Fusion"; L-VSSF's information-form fusion). With the predicted
prior ``N(F z + u, Q)`` of the step, writing ``D = I + Q J^obs``:

    A = D^{-1} F,   b = D^{-1}(u + Q h^obs),   C = D^{-1} Q,
    eta = F^T (I + J^obs Q)^{-1} (h^obs - J^obs u),   J = F^T (I + J^obs Q)^{-1} J^obs F.

The first step uses ``F = 0, u = m_0, Q = P_0`` (the prior). Prefix-combining the elements gives
the filtered beliefs (``parallel=True``); the per-step log-likelihoods ``log p(o_t | o_{0:t-1})``
are then evaluated from the predicted beliefs in one vectorised pass.

The sequential filter (``parallel=False``) is the textbook recursion instead: one scan of
:func:`inference.kalman.step.predict` and :func:`inference.kalman.step.update`, whose step emits
the predicted belief, the filtered belief and the step's log-likelihood (dense structure: one
Cholesky factorisation and two triangular solves per step). Both drivers give the same beliefs;
the log-likelihoods are summed after the scan (a float32 running sum drifts by more than a nat
over thousands of steps).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import Array

from . import _scan, step
from ._algebra import Algebra
from ._types import Dynamics, Emissions, FilterResult, Gaussian, LinearGaussian
from ._validate import Canonical, canonicalize, expand, expand_dynamics


def observation_information(alg: Algebra, c: Canonical) -> tuple[Array, Array]:
    """``(h_t^obs, J_t^obs)``: the observations' information about ``z_t``, ``h`` per step
    (leading axis ``T``); ``J`` per step too, or once (no time axis) for static ``R`` and ``H``
    without a mask (then ``R`` is factorised once). A mask needs the :func:`expand` ed form."""
    if alg.diagonal:
        prec = (1.0 if c.mask is None else c.mask) / c.R  # (K, d) or (T, K, d)
        return jnp.sum(prec * c.w, axis=1), jnp.sum(prec, axis=-2)
    chol = jnp.linalg.cholesky(c.R)  # masked rows carry a unit diagonal and zero H, w
    H = jnp.eye(c.w.shape[1], dtype=c.w.dtype) if c.H is None else c.H
    if c.R.ndim == 2:  # static: all steps' w as columns of one solve
        Lw = jax.scipy.linalg.solve_triangular(chol, c.w.T, lower=True).T[..., None]
    else:
        Lw = jax.scipy.linalg.solve_triangular(chol, c.w[..., None], lower=True)
    LH = jax.scipy.linalg.solve_triangular(chol, H, lower=True)
    HT = jnp.swapaxes(LH, -1, -2)
    return (HT @ Lw)[..., 0], HT @ LH


def filter_element(alg: Algebra, F, u, Q, h, J):
    """The element ``(A, b, C, eta, J)`` of one step (see the module docstring): one
    factorisation of ``D = I + Q J^obs`` serves both inverses (``I + J^obs Q = D^T``). The
    data-dependent right-hand sides are solved apart from the others, so that under ``vmap``
    over sequences that share parameters only they are batched."""
    solve, solve_T = alg.ipm(Q, J)
    A, C = solve(F, Q)
    (b,) = solve(u + alg.mv(Q, h))
    (JF,) = solve_T(alg.mm(J, F))
    (r,) = solve_T(h - alg.mv(J, u))
    return A, b, alg.sym(C), alg.mv(alg.T(F), r), alg.sym(alg.mm(alg.T(F), JF))


def filter_combine(alg: Algebra, earlier, later):
    """Associative combination of two filtering elements (Särkkä & García-Fernández, Lemma 8);
    one factorisation of ``M = I + C_i J_j`` serves both inverses (``I + J_j C_i = M^T``)."""
    Ai, bi, Ci, etai, Ji = earlier
    Aj, bj, Cj, etaj, Jj = later
    solve, solve_T = alg.ipm(Ci, Jj)
    (GT,) = solve_T(alg.T(Aj))  # (A_j (I + C_i J_j)^{-1})^T
    (KT,) = solve(Ai)  # (A_i^T (I + J_j C_i)^{-1})^T
    G, K = alg.T(GT), alg.T(KT)
    A = alg.mm(G, Ai)
    b = alg.mv(G, bi + alg.mv(Ci, etaj)) + bj
    C = alg.sym(alg.mm(alg.mm(G, Ci), alg.T(Aj)) + Cj)
    eta = alg.mv(K, etaj - alg.mv(Jj, bi)) + etai
    J = alg.sym(alg.mm(alg.mm(K, Jj), Ai) + Ji)
    return A, b, C, eta, J


def dynamics_per_step(alg: Algebra, dynamics: Dynamics) -> tuple[tuple, bool]:
    """Which of ``(A, b, Q)`` carry a time axis (static ones have the covariance's rank)."""
    rank = 1 if alg.diagonal else 2
    A, b, Q = dynamics
    return (A.ndim > rank, b is not None and b.ndim > 1, Q.ndim > rank)


def _observations(alg: Algebra, c: Canonical):
    """``(xs, at)``: the per-step observation arrays ``(w, R, mask, H)`` of a canonical model
    for ``lax.scan`` (static ones kept out), and ``at(xs_t)`` giving one step's full set."""
    varying = (True, c.R.ndim == 3, c.mask is not None, c.H is not None and c.H.ndim == 3)
    return _scan.per_step((c.w, c.R, c.mask, c.H), varying)


def _elements(alg: Algebra, c: Canonical):
    """The filtering elements of all steps (leading axis ``T``); a mask is expanded first."""
    if c.mask is not None:
        c = expand(alg, c)
    h, J = observation_information(alg, c)
    (m0, P0), (A, b, Q) = c.prior, expand_dynamics(c)
    F = jnp.concatenate([jnp.zeros_like(P0)[None], A])
    u = jnp.concatenate([m0[None], b])
    Qs = jnp.concatenate([P0[None], Q])
    J_axis = 0 if J.ndim == P0.ndim + 1 else None
    return jax.vmap(partial(filter_element, alg), in_axes=(0, 0, 0, 0, J_axis))(F, u, Qs, h, J)


def _sequential_filter(alg: Algebra, c: Canonical, unroll: int) -> FilterResult:
    """The textbook recursion, one ``lax.scan`` of :func:`step.predict` and
    :func:`step.condition` (the exported single step) that emits the predicted belief, the
    filtered belief and the log-likelihood of every step; static parameters stay out of the
    scanned inputs. The carry is the predicted belief, so step ``t`` conditions on ``o_t`` and
    predicts ``t + 1``: no output has to be joined to a first step afterwards. The last step's
    prediction is not needed (with time-varying dynamics their last entry stands in for it)."""
    obs, at_obs = _observations(alg, c)
    A, b, Q = c.dynamics
    T = c.w.shape[0]
    varying = dynamics_per_step(alg, c.dynamics)
    if T > 1 and any(varying):  # a stand-in for the last step's unused transition
        pad = lambda x, v: jnp.concatenate([x, x[-1:]]) if v else x  # noqa: E731
        A, b, Q = (pad(x, v) for x, v in zip((A, b, Q), varying, strict=True))
    dyn, at_dyn = _scan.per_step((A, b, Q), varying if T > 1 else (False,) * 3)

    def advance(predicted, inputs):
        o, d = inputs
        filtered, ll = step.condition(predicted, *at_obs(o))
        nxt = step.predict(filtered, Dynamics(*at_dyn(d))) if T > 1 else predicted
        return nxt, (predicted, filtered, ll)

    _, (pred, filt, lls) = jax.lax.scan(advance, c.prior, (obs, dyn), unroll=unroll)
    return FilterResult(pred, filt, lls, jnp.sum(lls))


def run_filter(alg: Algebra, c: Canonical, *, parallel: bool, unroll: int) -> FilterResult:
    """Filter a canonical model (shared by :func:`filter` and the smoother)."""
    if not parallel:
        return _sequential_filter(alg, c, unroll)
    (m0, P0) = c.prior
    elems = _elements(alg, c)
    mean, cov = _scan.scan(
        partial(filter_combine, alg),
        elems,
        parallel=parallel,
        unroll=unroll,
        read=lambda e: (e[1], e[2]),
        rebuild=lambda f, like: (jnp.zeros_like(like[0]), *f, *map(jnp.zeros_like, like[3:])),
    )
    filtered = Gaussian(mean, cov)
    axes = tuple(0 if v else None for v in dynamics_per_step(alg, c.dynamics))
    predict = lambda m, P, A, b, Q: step.predict(Gaussian(m, P), Dynamics(A, b, Q))  # noqa: E731
    pred = jax.vmap(predict, in_axes=(0, 0, *axes))(mean[:-1], cov[:-1], *c.dynamics)
    predicted = Gaussian(
        jnp.concatenate([m0[None], pred.mean]), jnp.concatenate([P0[None], pred.cov])
    )
    obs, at = _observations(alg, c)  # static ones are None in obs: not mapped
    lls = jax.vmap(lambda p, o: step.condition(p, *at(o))[1])(predicted, obs)
    return FilterResult(predicted, filtered, lls, jnp.sum(lls))


def filter(
    prior: Gaussian,
    dynamics: Dynamics,
    emissions: Emissions,
    *,
    parallel: bool = False,
    unroll: int = 1,
) -> FilterResult:
    """Kalman filter: predicted and filtered beliefs and the marginal log-likelihood.

    Args:
        prior: ``N(m_0, P_0)`` of ``z_0``; a vector ``P_0`` selects diagonal structure.
        dynamics: ``(A, b, Q)``, static or with a leading time axis of length ``T - 1``
            (``b`` may be ``None``).
        emissions: latent observations, noise, masks (see :class:`Emissions`).
        parallel: use ``lax.associative_scan`` (``O(log T)`` depth) instead of ``lax.scan``.
        unroll: loop unrolling of the sequential driver.

    Returns:
        A :class:`FilterResult`. Batch over sequences with ``jax.vmap``.
    """
    alg, c = canonicalize(prior, dynamics, emissions)
    return run_filter(alg, c, parallel=parallel, unroll=unroll)


def one_step_conditionals(
    prior: Gaussian, dynamics: Dynamics, emissions: Emissions
) -> tuple[Gaussian, LinearGaussian]:
    """The factors of the filtering (RSSM-style) posterior approximation, in closed form:

        q(z_0 | o_0) ∝ p(z_0) p(o_0 | z_0),
        q(z_t | z_{t-1}, o_t) ∝ p(z_t | z_{t-1}) p(o_t | z_t) = N(A z_{t-1} + b, C),

    which are exactly the ``(A, b, C)`` parts of the filter's elements. The product of these
    factors is the posterior an RSSM's inference network approximates (VRKN paper, Eq. 3);
    the smoothing posterior conditions on future observations too.

    Returns:
        ``(q(z_0 | o_0), LinearGaussian)`` with leading axis ``T - 1`` for ``t = 1..T-1``.
    """
    alg, c = canonicalize(prior, dynamics, emissions)
    A, b, C, _, _ = _elements(alg, c)
    return Gaussian(b[0], C[0]), LinearGaussian(A[1:], b[1:], C[1:])
