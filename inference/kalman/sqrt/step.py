"""One square-root Kalman step, on Cholesky factors, by QR factorisation (no covariance formed).

Everything here is one operation, the *triangularisation* ``tria(M)``: the lower-triangular
``L`` with ``L L^T = M M^T`` (``M^T = Q R``, ``L = R^T``, column signs chosen so that the
diagonal is non-negative), applied to the square root of a joint covariance. For a belief
``x ~ N(m, L L^T)`` and an affine-Gaussian map ``y | x ~ N(F x + c, Lc Lc^T)``::

    tria([[F L, Lc],        [[L_y,  0  ],       L_y: marginal of y,  N(F m + c, L_y L_y^T)
          [  L,  0]])   =    [ G,   L_x|y]]     y -> x reversed:  x | y ~ N(m + K (y - F m - c),
                                                                            L_x|y L_x|y^T),
                                                K = G L_y^{-1}

(Bierman/Morf-Kailath array algorithms; Yaghoobi, Corenflos, Hassan & Särkkä 2022, "Parallel
square-root statistical linear regression for inference in nonlinear state space models",
Sec. 3). With ``y`` the next state it gives the prediction and the RTS backward conditional
``q(z_t | z_{t+1}, o_{0:t})`` at once; with ``y`` the observation ``w = H z + N(0, R)`` it is the
update: ``L_y`` is the factor of ``S = H P H^T + R``, ``m+ = m + G v`` with
``v = L_y^{-1}(w - H m)``, ``L+ = L_x|y``, and

    log p(w) = -1/2 (v^T v + 2 sum_i log (L_y)_ii + p log 2 pi).

The covariance path of the update (``L_y, G, L+``) does not depend on the data, so under
``vmap`` over sequences that share parameters it stays unbatched (as in the covariance form).
"""

import math

import jax
import jax.numpy as jnp
from jax import Array
from jax._src.lax import linalg as _linalg  # geqrf (as _lapack_guard, which guards it)
from jax.scipy.linalg import solve_triangular

from .._validate import check_mask
from ._types import SqrtDynamics, SqrtGaussian, SqrtLinearGaussian

_LOG_2PI = math.log(2.0 * math.pi)


def _T(X: Array) -> Array:
    return jnp.swapaxes(X, -1, -2)


@jax.custom_jvp
def tria(M: Array) -> Array:
    """Lower-triangular ``L`` (``(..., n, n)``) with ``L L^T = M M^T`` for ``M`` ``(..., n, k)``,
    non-negative diagonal (the Cholesky factor of ``M M^T`` when it is positive definite).

    One Householder QR of ``M^T`` (LAPACK ``geqrf``: only ``R = L^T`` is needed, so the
    orthogonal factor, which ``jnp.linalg.qr(mode="r")`` still forms, is never built).
    """
    n, k = M.shape[-2:]
    if k < n:
        M = jnp.concatenate([M, jnp.zeros((*M.shape[:-1], n - k), M.dtype)], axis=-1)
    packed, _ = _linalg.geqrf(_T(M))
    L = jnp.tril(_T(packed[..., :n, :]))
    sign = jnp.where(jnp.diagonal(L, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(L.dtype)
    return L * sign[..., None, :]


@tria.defjvp
def _tria_jvp(primals, tangents):
    """The Cholesky factor's derivative (``L`` must be nonsingular): with ``C = L^{-1} M`` and
    ``B = L^{-1} dM``, ``dL = L Phi(B C^T + C B^T)``, ``Phi`` the lower triangle with half the
    diagonal (``d(M M^T) = dM M^T + M dM^T``)."""
    (M,), (dM,) = primals, tangents
    L = tria(M)
    C = solve_triangular(L, M, lower=True)
    B = solve_triangular(L, dM, lower=True)
    K = B @ _T(C)
    K = K + _T(K)
    phi = jnp.tril(K) - 0.5 * jnp.eye(K.shape[-1], dtype=K.dtype) * K
    return L, L @ phi


def joint(L: Array, F: Array, Lc: Array) -> tuple[Array, Array, Array]:
    """``(L_y, G, L_x|y)``: the blocks of ``tria([[F L, Lc], [L, 0]])`` (module docstring)."""
    q = F.shape[-2]
    top = jnp.concatenate([F @ L, Lc], axis=-1)
    bottom = jnp.concatenate([L, jnp.zeros((*L.shape[:-1], Lc.shape[-1]), L.dtype)], axis=-1)
    N = tria(jnp.concatenate([top, bottom], axis=-2))
    return N[..., :q, :q], N[..., q:, :q], N[..., q:, q:]


def gain(L_y: Array, G: Array) -> Array:
    """``K = G L_y^{-1}`` (one triangular solve)."""
    return _T(solve_triangular(L_y, _T(G), lower=True, trans=1))


def predict(belief: SqrtGaussian, dynamics: SqrtDynamics) -> SqrtGaussian:
    """``N(A m + b, tria([A L, L_Q]))``; ``b`` may be ``None``."""
    A, b, LQ = dynamics
    m, L = belief
    mean = A @ m if b is None else A @ m + b
    return SqrtGaussian(mean, tria(jnp.concatenate([A @ L, LQ], axis=-1)))


def predict_and_reverse(
    belief: SqrtGaussian, dynamics: SqrtDynamics
) -> tuple[SqrtGaussian, SqrtLinearGaussian]:
    """The prediction and the backward conditional ``z_t | z_{t+1} ~ N(E z_{t+1} + g, Lb Lb^T)``
    (``E`` the RTS gain, ``g = m - E (A m + b)``) from one QR of the joint of ``(z_{t+1}, z_t)``."""
    A, b, LQ = dynamics
    m, L = belief
    L_pred, G, L_back = joint(L, A, LQ)
    mean = A @ m if b is None else A @ m + b
    E = gain(L_pred, G)
    return SqrtGaussian(mean, L_pred), SqrtLinearGaussian(E, m - E @ mean, L_back)


def update_dense(
    belief: SqrtGaussian, w: Array, H: Array, LR: Array, num_observed: Array | int
) -> tuple[SqrtGaussian, Array]:
    """Condition ``N(m, L L^T)`` on ``w = H z + N(0, LR LR^T)`` (``(p,)``, ``(p, d)``, ``(p, p)``);
    unobserved rows must already be decoupled (:func:`decouple`). Returns the posterior and
    ``log p(w)`` over the ``num_observed`` observed rows."""
    m, L = belief
    L_S, G, L_post = joint(L, H, LR)
    v = solve_triangular(L_S, w - H @ m, lower=True)
    logdet = jnp.sum(jnp.log(jnp.diagonal(L_S, axis1=-2, axis2=-1)), axis=-1)
    ll = -0.5 * (v @ v + num_observed * _LOG_2PI) - logdet
    return SqrtGaussian(m + G @ v, L_post), ll


def decouple(w: Array, H: Array, LR: Array, seen: Array) -> tuple[Array, Array, Array]:
    """Make the rows with ``seen == 0`` carry no information: zero ``w`` and ``H`` there and
    give the noise a unit, uncoupled row, ``LR -> tria([seen * LR, diag(1 - seen)])`` (so that
    ``LR LR^T`` is ``R`` on the seen rows and the identity on the others)."""
    s = seen.astype(LR.dtype)
    LR = tria(jnp.concatenate([s[:, None] * LR, jnp.diag(1.0 - s)], axis=-1))
    return jnp.where(seen > 0, w, 0.0), s[:, None] * H, LR


def update(
    belief: SqrtGaussian,
    w: Array,
    chol_R: Array,
    mask: Array | None = None,
    H: Array | None = None,
) -> tuple[SqrtGaussian, Array]:
    """Condition one belief ``(d,), (d, d)`` on one step's ``w`` ``(p,)`` with noise square root
    ``chol_R`` ``(p, p)`` and ``H`` ``(p, d)`` (``None``: identity); ``mask`` ``None``, a scalar or
    ``(p,)`` (0/1). Returns ``(posterior, log-likelihood)``; masked entries of ``w`` may be NaN."""
    dtype = jnp.result_type(belief.mean)
    p = jnp.shape(w)[0]
    H = jnp.eye(p, dtype=dtype) if H is None else H
    if mask is None:
        return update_dense(belief, w, H, chol_R, p)
    check_mask("mask", jnp.asarray(mask))
    seen = jnp.broadcast_to(jnp.asarray(mask) > 0, (p,))
    w, H, chol_R = decouple(w, H, chol_R, seen)
    return update_dense(belief, w, H, chol_R, jnp.sum(seen))
