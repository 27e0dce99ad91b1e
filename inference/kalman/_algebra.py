"""The few matrix operations the kernels need, for diagonal and for dense structure.

Every kernel in this package is written once against an :class:`Algebra`; the diagonal algebra
makes it elementwise (a "matrix" is the vector of its diagonal, no inverse is ever formed), the
dense algebra uses matrix products, Cholesky factorisations and triangular solves (an LU only
in ``ipm``, whose ``I + X Y`` with PSD ``X, Y`` is not symmetric: the parallel filter's
elements). Only symmetric positive semi-definite matrices are ever passed to ``ipm``'s
factors, and only positive definite ones to ``solve_spd``, ``shrink`` and ``logdet_spd``.
``ipm`` factorises ``I + X Y`` once and solves every right-hand side with it, those of
``I + Y X = (I + X Y)^T`` (symmetric ``X, Y``) included, columns stacked into one solve.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.linalg import lu_factor, lu_solve, solve_triangular


class Algebra(NamedTuple):
    """Structure-specific primitives (diagonal or dense)."""

    diagonal: bool
    mm: Callable[[Array, Array], Array]  # X @ Y
    mv: Callable[[Array, Array], Array]  # X @ v
    T: Callable[[Array], Array]  # X^T
    solve_spd: Callable[[Array, Array], Array]  # X^{-1} Z for symmetric positive definite X
    ipm: Callable[[Array, Array], tuple[Callable, Callable]]  # solvers of I + X Y, I + Y X
    eye: Callable[[Array], Array]  # identity of X's structure
    sym: Callable[[Array], Array]  # symmetrise a covariance
    sqrt: Callable[[Array], Array]  # a factor L with L L^T = X (lower Cholesky)
    shrink: Callable[[Array, Array], Array]  # (I + X Y)^{-1} X for SPD X, PSD Y (symmetric)
    logdet_spd: Callable[[Array], Array]  # log det X for SPD X


def _stacked(solve: Callable[[Array], Array], rank: int) -> Callable[..., tuple[Array, ...]]:
    """``f(*Zs)``: ``solve`` of matrices (``rank`` dimensions, batch axes included) and vectors
    (one fewer) ``Zs``, their columns in one solve."""

    def many(*Zs: Array) -> tuple[Array, ...]:
        cols = [Z if Z.ndim == rank else Z[..., None] for Z in Zs]
        out = solve(jnp.concatenate(cols, axis=-1))
        ends = np.cumsum([c.shape[-1] for c in cols])[:-1]
        parts = jnp.split(out, ends, axis=-1)
        return tuple(p if Z.ndim == rank else p[..., 0] for p, Z in zip(parts, Zs, strict=True))

    return many


def _dense_ipm(X: Array, Y: Array):
    """``(solve, solve_T)``: ``solve(*Zs)`` gives ``(I + X Y)^{-1} Z`` for each ``Z`` and
    ``solve_T(*Zs)`` ``(I + Y X)^{-1} Z = (I + X Y)^{-T} Z`` (symmetric ``X, Y``), from one LU
    factorisation."""
    lu = lu_factor(jnp.eye(X.shape[-1], dtype=X.dtype) + X @ Y)
    r = X.ndim
    return _stacked(lambda Z: lu_solve(lu, Z), r), _stacked(lambda Z: lu_solve(lu, Z, trans=1), r)


def _diag_ipm(X: Array, Y: Array):
    D = 1.0 + X * Y
    solve = lambda *Zs: tuple(Z / D for Z in Zs)  # noqa: E731
    return solve, solve


def _dense_solve_spd(X: Array, Z: Array) -> Array:
    L = jnp.linalg.cholesky(X)
    return solve_triangular(L, solve_triangular(L, Z, lower=True), lower=True, trans=1)


def _dense_shrink(X: Array, Y: Array) -> Array:
    """``(I + X Y)^{-1} X = L (I + L^T Y L)^{-1} L^T`` with ``X = L L^T``: a Gram matrix, so
    symmetric positive semi-definite by construction."""
    L = jnp.linalg.cholesky(X)
    LT = jnp.swapaxes(L, -1, -2)
    M = jnp.eye(X.shape[-1], dtype=X.dtype) + LT @ Y @ L
    G = solve_triangular(jnp.linalg.cholesky(0.5 * (M + jnp.swapaxes(M, -1, -2))), LT, lower=True)
    return jnp.swapaxes(G, -1, -2) @ G


def _dense_logdet_spd(X: Array) -> Array:
    L = jnp.linalg.cholesky(X)
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


DIAG = Algebra(
    diagonal=True,
    mm=lambda X, Y: X * Y,
    mv=lambda X, v: X * v,
    T=lambda X: X,
    solve_spd=lambda X, Z: Z / X,
    ipm=_diag_ipm,
    eye=jnp.ones_like,
    sym=lambda X: X,
    sqrt=jnp.sqrt,
    shrink=lambda X, Y: X / (1.0 + X * Y),
    logdet_spd=lambda X: jnp.sum(jnp.log(X), axis=-1),
)

DENSE = Algebra(
    diagonal=False,
    mm=jnp.matmul,
    mv=lambda X, v: jnp.einsum("...ij,...j->...i", X, v),
    T=lambda X: jnp.swapaxes(X, -1, -2),
    solve_spd=_dense_solve_spd,
    ipm=_dense_ipm,
    eye=lambda X: jnp.broadcast_to(jnp.eye(X.shape[-1], dtype=X.dtype), X.shape),
    sym=lambda X: 0.5 * (X + jnp.swapaxes(X, -1, -2)),
    sqrt=jnp.linalg.cholesky,
    shrink=_dense_shrink,
    logdet_spd=_dense_logdet_spd,
)


def algebra_for(P0: Array) -> Algebra:
    """Diagonal algebra for a vector ``P0``, dense for a matrix."""
    return DIAG if P0.ndim == 1 else DENSE
