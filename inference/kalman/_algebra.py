"""The few matrix operations the kernels need, for diagonal and for dense structure.

Every kernel in this package is written once against an :class:`Algebra`; the diagonal algebra
makes it elementwise (a "matrix" is the vector of its diagonal, no inverse is ever formed), the
dense algebra uses matrix products and linear solves. Only symmetric positive semi-definite
matrices are ever passed to ``solve_ipm``'s factors, which the dense version relies on.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array
from jax.scipy.linalg import solve_triangular


class Algebra(NamedTuple):
    """Structure-specific primitives (diagonal or dense)."""

    diagonal: bool
    mm: Callable[[Array, Array], Array]  # X @ Y
    mv: Callable[[Array, Array], Array]  # X @ v
    T: Callable[[Array], Array]  # X^T
    solve: Callable[[Array, Array], Array]  # X^{-1} Z
    solve_ipm: Callable[[Array, Array, Array], Array]  # (I + X Y)^{-1} Z
    eye: Callable[[Array], Array]  # identity of X's structure
    sym: Callable[[Array], Array]  # symmetrise a covariance
    sqrt: Callable[[Array], Array]  # a factor L with L L^T = X (lower Cholesky)
    logdet_ipm: Callable[[Array, Array], Array]  # log det(I + X Y)
    quad_inv: Callable[[Array, Array], Array]  # v^T X^{-1} v for SPD X


def _dense_solve_ipm(X: Array, Y: Array, Z: Array) -> Array:
    d = X.shape[-1]
    return jnp.linalg.solve(jnp.eye(d, dtype=X.dtype) + X @ Y, Z)


def _dense_logdet_ipm(X: Array, Y: Array) -> Array:
    d = X.shape[-1]
    return jnp.linalg.slogdet(jnp.eye(d, dtype=X.dtype) + X @ Y)[1]


def _dense_quad_inv(X: Array, v: Array) -> Array:
    u = solve_triangular(jnp.linalg.cholesky(X), v, lower=True)
    return jnp.sum(u * u)


DIAG = Algebra(
    diagonal=True,
    mm=lambda X, Y: X * Y,
    mv=lambda X, v: X * v,
    T=lambda X: X,
    solve=lambda X, Z: Z / X,
    solve_ipm=lambda X, Y, Z: Z / (1.0 + X * Y),
    eye=jnp.ones_like,
    sym=lambda X: X,
    sqrt=jnp.sqrt,
    logdet_ipm=lambda X, Y: jnp.sum(jnp.log1p(X * Y)),
    quad_inv=lambda X, v: jnp.sum(v * v / X),
)

DENSE = Algebra(
    diagonal=False,
    mm=jnp.matmul,
    mv=lambda X, v: jnp.einsum("...ij,...j->...i", X, v),
    T=lambda X: jnp.swapaxes(X, -1, -2),
    solve=jnp.linalg.solve,
    solve_ipm=_dense_solve_ipm,
    eye=lambda X: jnp.broadcast_to(jnp.eye(X.shape[-1], dtype=X.dtype), X.shape),
    sym=lambda X: 0.5 * (X + jnp.swapaxes(X, -1, -2)),
    sqrt=jnp.linalg.cholesky,
    logdet_ipm=_dense_logdet_ipm,
    quad_inv=_dense_quad_inv,
)


def algebra_for(P0: Array) -> Algebra:
    """Diagonal algebra for a vector ``P0``, dense for a matrix."""
    return DIAG if P0.ndim == 1 else DENSE
