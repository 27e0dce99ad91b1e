"""One Kalman step: ``predict`` through the dynamics, ``update`` on one step's observations.

These are the sequential filter's step (``parallel=False`` scans exactly these two) and the
belief step of every model that filters online (VRKN, KalMamba, EKVAE, L-VSSF and a user's
own models): the Kalman algebra is written here and nowhere else.

Structure follows the belief: a covariance of the mean's shape is *diagonal* (variances,
elementwise, any leading batch axes), a ``(d, d)`` matrix is *dense* (one belief; batch with
``jax.vmap``).

    predict:  N(m, P)  ->  N(A m + b, A P A^T + Q)

    update, diagonal (K sensors ``w_k = z + N(0, R_k)``, information form; a masked entry
    carries no information):
        J = sum_k mask_k / R_k,   h = sum_k mask_k w_k / R_k,
        P+ = P / (1 + P J),       m+ = (m + P h) / (1 + P J)

    update, dense (``w = H z + N(0, R)``, covariance form, one Cholesky factor of S):
        S = H P H^T + R = L L^T,   U = L^{-1} H P,   v = L^{-1} (w - H m),
        m+ = m + U^T v,            P+ = P - U^T U,
        log p(w) = -1/2 (v^T v + 2 sum_i log L_ii + p log 2 pi).

Both return the step's log-likelihood ``log p(w_t | o_{0:t-1}) = log N(w; H m, H P H^T + R)``
over the observed entries.
"""

import math

import jax.numpy as jnp
from jax import Array
from jax.scipy.linalg import solve_triangular

from ._types import Dynamics, Gaussian
from ._validate import check_mask

_LOG_2PI = math.log(2.0 * math.pi)


def is_diagonal(belief: Gaussian) -> bool:
    """Diagonal structure: the covariance has the mean's shape (variances)."""
    return jnp.shape(belief.cov) == jnp.shape(belief.mean)


def predict(belief: Gaussian, dynamics: Dynamics) -> Gaussian:
    """``N(A m + b, A P A^T + Q)``; ``b`` may be ``None``. Diagonal ``A, Q`` are vectors."""
    A, b, Q = dynamics
    m, P = belief
    if is_diagonal(belief):
        mean, cov = A * m, A * A * P + Q
    else:
        AP = A @ P
        mean, cov = A @ m, AP @ A.T + Q
        cov = 0.5 * (cov + cov.T)
    return Gaussian(mean if b is None else mean + b, cov)


def update_diagonal(
    belief: Gaussian, w: Array, R: Array, mask: Array | None
) -> tuple[Gaussian, Array]:
    """Condition ``N(m, diag P)`` ``(..., d)`` on ``K`` sensors ``w, R`` ``(..., K, d)``;
    ``mask`` (0/1, broadcastable to ``w``; ``None``: all seen) marks what was seen; masked
    entries of ``w`` and ``R`` may hold anything. Returns the posterior and the log-likelihood
    ``(...)``.

    The log-likelihood splits, with the fused pseudo-observation ``ybar = h / J`` of variance
    ``1 / J``, into the sensors' disagreement ``sum_k (w_k - ybar)^2 / R_k`` and
    ``(ybar - m)^2 / (P + 1/J)`` (matrix determinant lemma for the log-determinant): no
    cancellation, no division by zero for an unobserved coordinate. With one sensor the
    disagreement is zero and ``ybar = w``: ``(w - m)^2 J / (1 + P J)``.
    """
    m, P = belief
    if mask is None:
        prec, logR = 1.0 / R, jnp.log(R) + _LOG_2PI
    else:
        seen = jnp.broadcast_to(mask, w.shape) > 0
        prec = jnp.where(seen, 1.0 / jnp.where(seen, R, 1.0), 0.0)
        w = jnp.where(seen, w, 0.0)
        logR = jnp.where(seen, jnp.log(jnp.where(seen, R, 1.0)) + _LOG_2PI, 0.0)
    J = jnp.sum(prec, axis=-2)
    h = jnp.sum(prec * w, axis=-2)
    denom = 1.0 + P * J
    if w.shape[-2] == 1:  # one sensor: ybar = w where seen (w is zero where not, and so is J)
        quad = (w[..., 0, :] - m) ** 2 * J / denom
    else:
        observed = J > 0
        ybar = jnp.where(observed, h / jnp.where(observed, J, 1.0), 0.0)
        spread = jnp.sum(prec * (w - ybar[..., None, :]) ** 2, axis=-2)
        quad = spread + (ybar - m) ** 2 * J / denom
    ll = -0.5 * jnp.sum(quad + jnp.sum(logR, axis=-2) + jnp.log(denom), axis=-1)
    return Gaussian((m + P * h) / denom, P / denom), ll


def update_dense(
    belief: Gaussian, w: Array, H: Array | None, R: Array, num_observed: Array | int
) -> tuple[Gaussian, Array]:
    """Condition ``N(m, P)`` on ``w = H z + N(0, R)`` (one belief, ``(p,)``, ``(p, d)`` or
    ``None`` for the identity, ``(p, p)``). Unobserved rows must already be decoupled (zero in
    ``w`` and ``H``, a unit row and column in ``R``); ``num_observed`` counts the others (for the
    ``log 2 pi`` term)."""
    m, P = belief
    HP = P if H is None else H @ P
    S = (HP if H is None else HP @ H.T) + R
    L = jnp.linalg.cholesky(0.5 * (S + S.T))
    # two solves, not one with [HP | r]: the covariances do not depend on the data, so under
    # ``vmap`` over sequences that share parameters this one stays unbatched (a 10x difference)
    U = solve_triangular(L, HP, lower=True)
    v = solve_triangular(L, w - (m if H is None else H @ m), lower=True)
    cov = P - U.T @ U
    ll = -0.5 * (v @ v + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L))) + num_observed * _LOG_2PI)
    return Gaussian(m + U.T @ v, 0.5 * (cov + cov.T)), ll


def condition(
    belief: Gaussian, w: Array, R: Array, mask: Array | None, H: Array | None
) -> tuple[Gaussian, Array]:
    """:func:`update` on arguments already in the filter's per-step form, unchecked.

    Diagonal: ``w, R`` ``(..., K, d)``, ``mask`` ``None`` or broadcastable to ``w``. Dense:
    ``w`` ``(p,)``, ``R`` ``(p, p)``, ``H`` ``(p, d)`` or ``None`` (identity), ``mask`` ``None``
    or ``(p,)``; masked rows are decoupled here.
    """
    if is_diagonal(belief):
        return update_diagonal(belief, w, R, mask)
    if mask is None:
        return update_dense(belief, w, H, R, jnp.shape(w)[0])
    p, dtype = jnp.shape(w)[0], jnp.result_type(belief.mean)
    seen = jnp.broadcast_to(jnp.asarray(mask) > 0, (p,))
    pair = seen[:, None] & seen[None, :]
    R = jnp.where(pair, R, 0.0) + jnp.diag(jnp.where(seen, 0.0, 1.0).astype(dtype))
    H = jnp.where(seen[:, None], jnp.eye(p, dtype=dtype) if H is None else H, 0.0)
    return update_dense(belief, jnp.where(seen, w, 0.0), H, R, jnp.sum(seen))


def update(
    belief: Gaussian, w: Array, R: Array, mask: Array | None = None, H: Array | None = None
) -> tuple[Gaussian, Array]:
    """Condition a belief on one step's observations; returns ``(posterior, log-likelihood)``.

    Diagonal belief ``(..., d)``: ``w, R`` ``(..., d)`` (one sensor) or ``(..., K, d)``;
    ``mask`` ``None``, or 0/1 of shape ``(...)``, ``(..., K)`` or ``w``'s; ``H`` must be ``None``.
    Dense belief ``(d,), (d, d)``: ``w`` ``(p,)``, ``H`` ``(p, d)`` (``None``: identity), ``R``
    ``(p, p)``, ``mask`` ``None``, a scalar or ``(p,)``.
    """
    dtype = jnp.result_type(belief.mean)
    if mask is not None:
        check_mask("mask", jnp.asarray(mask))
    if not is_diagonal(belief):
        return condition(belief, w, R, mask, H)
    if H is not None:
        raise ValueError("H must be None for a diagonal belief (identity)")
    single = jnp.ndim(w) == jnp.ndim(belief.mean)
    w, R = (w[..., None, :], R[..., None, :]) if single else (w, R)
    if mask is not None:
        mask = jnp.asarray(mask, dtype)
        if single and mask.ndim == jnp.ndim(w) - 1:  # per entry of the one sensor
            mask = mask[..., None, :]
        mask = mask.reshape(mask.shape + (1,) * (jnp.ndim(w) - mask.ndim))  # per step/sensor
    return update_diagonal(belief, w, R, mask)
