"""Square-root Kalman filter, sequential (a scan of :mod:`.step`) or parallel (associative scan).

Sequential: the textbook recursion on Cholesky factors; the step emits the predicted belief,
the filtered belief, the log-likelihood and, for the smoother, the backward conditional (the
prediction and the RTS conditional come from one QR, :func:`.step.predict_and_reverse`).

Parallel: the filtering elements of Särkkä & García-Fernández (2021, Lemma 7) with square roots
``C = U U^T`` and ``J = Z Z^T`` (Yaghoobi et al. 2022, Sec. 4). For step ``t`` with predicted
prior ``N(F z_{t-1} + u, L_Q L_Q^T)`` (``F = 0, u = m_0, L_Q = L_0`` at ``t = 0``), the update's
``(L_S, G, U) = step.joint(L_Q, H, L_R)`` and ``W = L_S^{-1} H F`` give

    A = F - G W,   b = u + G v,   U,   Z = W^T,   eta = Z v,      v = L_S^{-1} (w - H u).

Combining ``(earlier i, later j)``, with ``tria([[U_i^T Z_j, I], [Z_j, 0]]) = [[Y, 0], [X21, X22]]``
(so ``Y Y^T = I + U_i^T J_j U_i``, ``D = I - U_i Y^{-T} X21^T = (I + C_i J_j)^{-1}``,
``X22 X22^T = J_j D``) and the innovation ``r = eta_j - Z_j Z_j^T b_i``, ``q = Y^{-1} U_i^T r``::

    A = A_j D A_i,                      b = A_j (b_i + U_i Y^{-T} q) + b_j,
    U = tria([A_j U_i Y^{-T}, U_j]),    eta = A_i^T (r - X21 q) + eta_i,
    Z = tria([A_i^T X22, Z_i]).

These are Yaghoobi et al.'s combination with the means written as updates, ``b_i`` plus a gain
times the innovation (``D (b_i + C_i eta_j) = b_i + U_i Y^{-T} q``, ``D^T r = r - X21 q``), not
as ``D (b_i + C_i eta_j)``: ``C_i eta_j`` is a product of the largest variances and precisions,
and in float32 its rounding error survives the multiplication by ``D`` (on the ill-conditioned
model of the tests it cost the smoothed means half their magnitude).

Only ``J``'s square root ``Z`` may be singular (it has the rank of the observations seen); a
QR factorisation is not differentiable there, so the parallel filter's derivatives are those
of the sequential filter (a ``custom_jvp``: the same function, differentiated through the
recursion whose factorisations are all of full rank).
"""

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from .._types import FilterResult
from . import step
from ._types import SqrtDynamics, SqrtEmissions, SqrtGaussian
from ._validate import SqrtCanonical, canonicalize


def _observations(c: SqrtCanonical):
    return c.w, c.H, c.LR, c.num_observed


def run_sequential(c: SqrtCanonical, *, backward: bool, unroll: int = 1):
    """``(FilterResult, backward conditionals or None)`` by the square-root recursion."""
    obs = _observations(c)
    first, ll0 = step.update_dense(c.prior, *(x[0] for x in obs))
    advance = step.predict_and_reverse if backward else lambda f, dyn: (step.predict(f, dyn), None)

    def body(filtered, inputs):
        dynamics, o = inputs
        predicted, back = advance(filtered, dynamics)
        filtered, ll = step.update_dense(predicted, *o)
        return filtered, (predicted, filtered, ll, back)

    rest = tuple(x[1:] for x in obs)
    _, (pred, filt, lls, back) = jax.lax.scan(body, first, (c.dynamics, rest), unroll=unroll)
    join = lambda a, x: jnp.concatenate([a[None], x])  # noqa: E731
    lls = join(ll0, lls)
    result = FilterResult(
        jax.tree.map(join, c.prior, pred), jax.tree.map(join, first, filt), lls, jnp.sum(lls)
    )
    return result, back


def _element(F, u, LQ, w, H, LR):
    L_S, G, U = step.joint(LQ, H, LR)
    v = solve_triangular(L_S, w - H @ u, lower=True)
    W = solve_triangular(L_S, H @ F, lower=True)
    Z = W.T
    d, p = Z.shape
    Zsq = step.tria(Z) if p > d else jnp.concatenate([Z, jnp.zeros((d, d - p), Z.dtype)], 1)
    return F - G @ W, u + G @ v, U, Z @ v, Zsq


def _combine(earlier, later):
    Ai, bi, Ui, etai, Zi = earlier
    Aj, bj, Uj, etaj, Zj = later
    d = Ai.shape[-1]
    T = lambda X: jnp.swapaxes(X, -1, -2)  # noqa: E731
    mv = lambda X, v: jnp.einsum("...ij,...j->...i", X, v)  # noqa: E731
    eye = jnp.broadcast_to(jnp.eye(d, dtype=Ai.dtype), Ai.shape)
    top = jnp.concatenate([T(Ui) @ Zj, eye], -1)
    X = step.tria(jnp.concatenate([top, jnp.concatenate([Zj, jnp.zeros_like(Zj)], -1)], -2))
    Y, X21, X22 = X[..., :d, :d], X[..., d:, :d], X[..., d:, d:]
    UY = T(solve_triangular(Y, T(Ui), lower=True))  # U_i Y^{-T}
    innov = etaj - mv(Zj, mv(T(Zj), bi))  # eta_j - J_j b_i
    q = solve_triangular(Y, mv(T(Ui), innov)[..., None], lower=True)[..., 0]
    A = Aj @ (Ai - UY @ (T(X21) @ Ai))  # A_j D A_i
    b = mv(Aj, bi + mv(UY, q)) + bj
    U = step.tria(jnp.concatenate([Aj @ UY, Uj], -1))
    eta = mv(T(Ai), innov - mv(X21, q)) + etai
    Z = step.tria(jnp.concatenate([T(Ai) @ X22, Zi], -1))
    return A, b, U, eta, Z


def _elements(c: SqrtCanonical):
    (m0, L0), (A, b, LQ) = c.prior, c.dynamics
    F = jnp.concatenate([jnp.zeros_like(L0)[None], A])
    u = jnp.concatenate([m0[None], b])
    Ls = jnp.concatenate([L0[None], LQ])
    return jax.vmap(_element)(F, u, Ls, c.w, c.H, c.LR)


@jax.custom_jvp
def _parallel_filtered(c: SqrtCanonical) -> SqrtGaussian:
    _, b, U, _, _ = jax.lax.associative_scan(_combine, _elements(c))
    return SqrtGaussian(b, U)


@_parallel_filtered.defjvp
def _parallel_filtered_jvp(primals, tangents):
    (c,), (dc,) = primals, tangents
    fn = lambda c: run_sequential(c, backward=False)[0].filtered  # noqa: E731
    return jax.jvp(fn, (c,), (dc,))


def run_parallel(c: SqrtCanonical, *, backward: bool):
    """``(FilterResult, backward conditionals or None)`` by the associative scan; predicted
    beliefs, backward conditionals and log-likelihoods then come from one vectorised step."""
    filtered = _parallel_filtered(c)
    now = jax.tree.map(lambda x: x[:-1], filtered)
    if backward:
        pred, back = jax.vmap(step.predict_and_reverse)(now, c.dynamics)
    else:
        pred, back = jax.vmap(step.predict)(now, c.dynamics), None
    predicted = jax.tree.map(lambda a, x: jnp.concatenate([a[None], x]), c.prior, pred)
    lls = jax.vmap(lambda p, *o: step.update_dense(p, *o)[1])(predicted, *_observations(c))
    return FilterResult(predicted, filtered, lls, jnp.sum(lls)), back


def run(c: SqrtCanonical, *, parallel: bool, backward: bool, unroll: int = 1):
    """Filter a canonical model (shared by :func:`filter`, the smoother and FFBS)."""
    if parallel:
        return run_parallel(c, backward=backward)
    return run_sequential(c, backward=backward, unroll=unroll)


def filter(
    prior: SqrtGaussian,
    dynamics: SqrtDynamics,
    emissions: SqrtEmissions,
    *,
    parallel: bool = False,
    unroll: int = 1,
) -> FilterResult:
    """Square-root Kalman filter: predicted and filtered beliefs as :class:`SqrtGaussian`
    (lower Cholesky factors) and the marginal log-likelihood.

    Args:
        prior: ``N(m_0, L_0 L_0^T)``.
        dynamics: ``(A, b, L_Q)``, static or with a leading time axis ``T - 1``
            (``b`` may be ``None``).
        emissions: ``(w, L_R, mask, H)`` as :class:`~inference.kalman.Emissions` with the
            noise's square root (:func:`stack_sensors` for several sensors).
        parallel: ``lax.associative_scan`` (``O(log T)`` depth) instead of ``lax.scan``.
        unroll: loop unrolling of the sequential driver.

    Returns:
        A :class:`~inference.kalman.FilterResult` of :class:`SqrtGaussian` s. Batch with
        ``jax.vmap``; :func:`from_sqrt` gives the covariance form's result.
    """
    c = canonicalize(prior, dynamics, emissions)
    return run(c, parallel=parallel, backward=False, unroll=unroll)[0]
