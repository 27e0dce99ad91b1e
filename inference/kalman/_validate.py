"""Shape checks, value checks and normalisation of the user's model into the kernels' form.

Shapes are checked always (at trace time under ``jit``); values (finite parameters, positive
variances, finite unmasked observations, masks that are boolean or 0/1) are checked whenever
the arrays are concrete, i.e. outside ``jit``. Every error is a ``ValueError`` naming the
offending argument.

Under ``jit`` / ``vmap`` / ``grad`` the values are unknown when the checks run, so by default
they are skipped: a zero variance then gives NaN or a finite, wrong log-likelihood. The same
checks are staged into the traced program as ``checkify.debug_check`` s, which cost nothing
(they are dropped when it is compiled) unless the program is run through
:func:`inference.kalman.checked`, which runs them inside the compiled code and raises the first
failure as a ``ValueError`` (checkify's ``JaxRuntimeError``) when it returns::

    @jax.jit
    def loglik(w, R):
        return kalman.filter(prior, dynamics, kalman.Emissions(w, R)).log_likelihood

    kalman.checked(loglik)(w, R)  # ValueError "R must be positive ..." for a zero variance
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.experimental import checkify

from ._algebra import Algebra, algebra_for
from ._types import Dynamics, Emissions, Gaussian


class Canonical(NamedTuple):
    """The checked model in the kernels' form (internal).

    Parameters keep the form they were given in: static ones without a time axis, time-varying
    ones with it (``dynamics`` ``T - 1``, emissions ``T``), which their number of dimensions
    tells apart; ``b`` may be ``None`` and ``mask`` is ``None`` when everything is observed.
    Diagonal: ``w`` ``(T, K, d)``, ``R`` ``(K, d)`` or ``(T, K, d)``, ``mask`` broadcastable to
    ``w`` (``(T, 1, 1)``, ``(T, K, 1)`` or ``(T, K, d)``), ``H`` None. Dense: ``w`` ``(T, p)``,
    ``R`` ``(p, p)`` or ``(T, p, p)``, ``H`` ``None`` (identity), ``(p, d)`` or ``(T, p, d)``,
    ``mask`` ``(T, p)``; masked rows are decoupled per step (:func:`step.condition`).
    :func:`expand` gives the all-time-varying form the parallel elements need.
    """

    prior: Gaussian
    dynamics: Dynamics
    w: Array
    R: Array
    mask: Array | None
    H: Array | None


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _shape_error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(got)}, expected {expected}")


def _time_varying(name: str, x: Array, static_shape: tuple, n: int) -> Array:
    """Broadcast a static array to ``(n, *static_shape)``; accept an already time-varying one."""
    if x.shape == static_shape:
        return jnp.broadcast_to(x, (n, *static_shape))
    if x.shape == (n, *static_shape):
        return x
    raise _shape_error(name, x.shape, f"{static_shape} (static) or {(n, *static_shape)}")


def _staged_check(ok: Array, message: str) -> None:
    """Stage ``all(ok)`` for a traced ``ok``: run by :func:`inference.kalman.checked` (through
    ``checkify``), a no-op otherwise (the check and what only it uses are dropped when
    compiled). ``message`` must not contain braces (it is a format string)."""
    checkify.debug_check(jnp.all(ok), message)


def _check_finite(name: str, x: Array) -> None:
    message = f"{name} contains NaN or infinite values"
    if not _concrete(x):
        _staged_check(jnp.isfinite(x), message)
    elif not bool(np.all(np.isfinite(np.asarray(x)))):
        raise ValueError(message)


def _staged_variance_checks(name: str, x: Array, diagonal: bool) -> None:
    """The traced counterpart of :func:`_check_variance` (positive definite by Cholesky)."""
    if diagonal:
        _staged_check(x > 0, f"{name} must be positive")
        return
    xT = jnp.swapaxes(x, -1, -2)
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(x)))
    _staged_check(jnp.abs(x - xT) <= 1e-5 * jnp.abs(xT) + 1e-8 * scale, f"{name} must be symmetric")
    chol = jnp.linalg.cholesky(0.5 * (x + xT))
    _staged_check(
        jnp.diagonal(chol, axis1=-2, axis2=-1) > 0, f"{name} must be positive definite"
    )  # a non-PD matrix gives NaN (False here), a singular PSD one a zero


def _check_variance(name: str, x: Array, diagonal: bool) -> None:
    """Variances must be positive (diagonal) or symmetric positive definite (dense)."""
    _check_finite(name, x)
    if np.size(x) == 0:
        return
    if not _concrete(x):
        _staged_variance_checks(name, x, diagonal)
        return
    v = np.asarray(x, dtype=np.float64)
    if diagonal:
        if np.any(v <= 0):
            raise ValueError(f"{name} must be positive")
        return
    if not np.allclose(v, np.swapaxes(v, -1, -2), rtol=1e-5, atol=1e-8 * max(1.0, np.abs(v).max())):
        raise ValueError(f"{name} must be symmetric")
    if np.any(np.linalg.eigvalsh(0.5 * (v + np.swapaxes(v, -1, -2))) <= 0):
        raise ValueError(f"{name} must be positive definite")


def check_mask(name: str, mask: Array) -> None:
    """A mask must be boolean or hold only 0 and 1: the kernels scale each observation's
    precision by its mask, so 0.5 or 2 would silently reweight the data and -1 give NaN."""
    message = f"{name} must be boolean or 0/1"
    if not _concrete(mask):
        if not jnp.issubdtype(mask.dtype, jnp.bool_):
            _staged_check((mask == 0) | (mask == 1), message)
        return
    m = np.asarray(mask)
    if m.dtype == bool:
        return
    bad = (m != 0) & (m != 1)
    if bad.any():
        raise ValueError(
            f"{message}, got {m[bad].flat[0].item()!r} at index {np.argwhere(bad)[0].tolist()}"
        )


def _mask(mask: Array | None, w: Array, dtype) -> Array:
    if mask is None:
        return jnp.ones(w.shape, dtype)
    if not isinstance(mask, jax.core.Tracer):
        mask = np.asarray(mask)  # read once (a device array would be copied per check)
    if np.shape(mask) != w.shape[: np.ndim(mask)] or np.ndim(mask) == 0:
        raise _shape_error("mask", np.shape(mask), f"a prefix of w's shape {w.shape}")
    check_mask("mask", mask)
    mask = jnp.asarray(mask)
    mask = mask.astype(dtype).reshape(mask.shape + (1,) * (w.ndim - mask.ndim))
    return jnp.broadcast_to(mask, w.shape)


def _given_mask(mask: Array | None, w: Array, dtype) -> Array | None:
    """The mask as ``dtype``, with trailing unit axes up to ``w``'s rank (unbroadcast)."""
    if mask is None:
        return None
    if not isinstance(mask, jax.core.Tracer):
        mask = np.asarray(mask)  # read once (a device array would be copied per check)
    if np.shape(mask) != w.shape[: np.ndim(mask)] or np.ndim(mask) == 0:
        raise _shape_error("mask", np.shape(mask), f"a prefix of w's shape {w.shape}")
    check_mask("mask", mask)
    mask = jnp.asarray(mask).astype(dtype)
    return mask.reshape(mask.shape + (1,) * (w.ndim - mask.ndim))


def _static_or_varying(name: str, x: Array, static_shape: tuple, n: int) -> Array:
    """Check that ``x`` is ``static_shape`` or ``(n, *static_shape)``; return it unbroadcast."""
    if x.shape not in (static_shape, (n, *static_shape)):
        raise _shape_error(name, x.shape, f"{static_shape} (static) or {(n, *static_shape)}")
    return x


def canonicalize(
    prior: Gaussian, dynamics: Dynamics, emissions: Emissions
) -> tuple[Algebra, Canonical]:
    """Check the model's shapes and values and bring it into :class:`Canonical` form."""
    m0, P0 = (jnp.asarray(x) for x in prior)
    A, b, Q = (None if x is None else jnp.asarray(x) for x in dynamics)
    w, R = jnp.asarray(emissions.w), jnp.asarray(emissions.R)
    H = None if emissions.H is None else jnp.asarray(emissions.H)
    arrays = [x for x in (m0, P0, A, b, Q, w, R, H) if x is not None]
    dtype = jnp.result_type(float, *arrays)
    m0, P0, A, Q, w, R = (x.astype(dtype) for x in (m0, P0, A, Q, w, R))
    if m0.ndim != 1:
        raise _shape_error("prior mean m0", m0.shape, "(d,)")
    d = m0.shape[0]
    if P0.shape not in ((d,), (d, d)):
        raise _shape_error("prior covariance P0", P0.shape, f"({d},) (diagonal) or ({d}, {d})")
    alg = algebra_for(P0)
    cov = (d,) if alg.diagonal else (d, d)
    if w.ndim < 2:
        raise _shape_error("w", w.shape, "(T, d), (T, K, d) or (T, p)")
    T = w.shape[0]
    if T < 1:
        raise ValueError("w must have at least one time step")
    A = _static_or_varying("A", A, cov, T - 1)
    Q = _static_or_varying("Q", Q, cov, T - 1)
    b = None if b is None else _static_or_varying("b", b.astype(dtype), (d,), T - 1)
    mask = _given_mask(emissions.mask, w, dtype)

    if alg.diagonal:
        if H is not None:
            raise ValueError(
                "H must be None for diagonal structure (identity); mark unobserved "
                "coordinates of a sensor in the mask instead"
            )
        if w.ndim == 2:
            w = w[:, None]
            mask = None if mask is None else mask[:, None]
            R = R[None] if R.ndim == 1 else R[:, None]
        if w.ndim != 3 or w.shape[2] != d:
            raise _shape_error("w", emissions.w.shape, f"(T, {d}) or (T, K, {d})")
        R = _static_or_varying("R", R, w.shape[1:], T)
        obs = True if mask is None else jnp.broadcast_to(mask, w.shape) > 0
        _check_variance("R", R if mask is None else jnp.where(obs, R, 1.0), True)
        _check_finite("w (where observed)", w if mask is None else jnp.where(obs, w, 0.0))
    else:
        if w.ndim != 2:
            raise _shape_error("w", w.shape, "(T, p) for dense structure")
        p = w.shape[1]
        if H is None and p != d:
            raise ValueError(f"H is None (identity) but w has {p} columns and the state {d}")
        if H is not None:
            H = _static_or_varying("H", H.astype(dtype), (p, d), T)
            _check_finite("H", H)
        R = _static_or_varying("R", R, (p, p), T)
        _check_variance("R", R, False)
        _check_finite("w (where observed)", w if mask is None else jnp.where(mask > 0, w, 0.0))

    _check_finite("prior mean m0", m0)
    _check_variance("prior covariance P0", P0, alg.diagonal)
    _check_finite("A", A)
    if b is not None:
        _check_finite("b", b)
    _check_variance("Q", Q, alg.diagonal)
    return alg, Canonical(Gaussian(m0, P0), Dynamics(A, b, Q), w, R, mask, H)


def expand_dynamics(c: Canonical) -> Dynamics:
    """``(A, b, Q)`` with a time axis each (``T - 1``), ``b`` explicit."""
    (m0, P0), (A, b, Q) = c.prior, c.dynamics
    T, d = c.w.shape[0], m0.shape[0]
    A, Q = (_time_varying(n, x, P0.shape, T - 1) for n, x in (("A", A), ("Q", Q)))
    b = jnp.zeros((T - 1, d), m0.dtype) if b is None else _time_varying("b", b, (d,), T - 1)
    return Dynamics(A, b, Q)


def expand(alg: Algebra, c: Canonical) -> Canonical:
    """Every parameter time-varying, ``b`` and ``mask`` explicit, masked entries neutral (the
    parallel elements' form): diagonal ``w`` zero and ``R`` one where masked; dense ``H`` and
    ``w`` rows zero and ``R`` a unit row and column where masked."""
    m0 = c.prior.mean
    T, d, dtype = c.w.shape[0], m0.shape[0], m0.dtype
    mask = jnp.ones(c.w.shape, dtype) if c.mask is None else jnp.broadcast_to(c.mask, c.w.shape)
    obs = mask > 0
    if alg.diagonal:
        R = _time_varying("R", c.R, c.w.shape[1:], T)
        R, w, H = jnp.where(obs, R, 1.0), jnp.where(obs, c.w, 0.0), None
    else:
        p = c.w.shape[1]
        H = jnp.eye(d, dtype=dtype) if c.H is None else c.H
        H = _time_varying("H", H, (p, d), T)
        R = _time_varying("R", c.R, (p, p), T)
        pair = obs[:, :, None] & obs[:, None, :]
        R = jnp.where(pair, R, 0.0) + jnp.where(obs, 0.0, 1.0)[..., None] * jnp.eye(p, dtype=dtype)
        H = jnp.where(obs[..., None], H, 0.0)
        w = jnp.where(obs, c.w, 0.0)
    return Canonical(c.prior, expand_dynamics(c), w, R, mask, H)


def stack_sensors(sensors: list[Emissions]) -> Emissions:
    """Stack dense sensors ``(w_k (T, p_k), R_k, mask_k (T,) or None, H_k)`` into one
    :class:`Emissions` with block-diagonal ``R`` and a per-row mask, for the dense structure.

    Every ``H_k`` must be given (``(p_k, d)`` or ``(T, p_k, d)``); static and time-varying
    parameters may be mixed.
    """
    if not sensors:
        raise ValueError("stack_sensors needs at least one sensor")
    T = jnp.shape(sensors[0].w)[0]
    ws, Hs, Rs, masks = [], [], [], []
    for k, s in enumerate(sensors):
        w = jnp.asarray(s.w)
        if w.ndim != 2 or w.shape[0] != T:
            raise _shape_error(f"sensors[{k}].w", w.shape, f"({T}, p_{k})")
        if s.H is None:
            raise ValueError(f"sensors[{k}].H must be given to stack sensors")
        p = w.shape[1]
        H, R = jnp.asarray(s.H), jnp.asarray(s.R)
        d = H.shape[-1]
        Hs.append(_time_varying(f"sensors[{k}].H", H, (p, d), T))
        Rs.append(_time_varying(f"sensors[{k}].R", R, (p, p), T))
        m = jnp.ones((T,)) if s.mask is None else s.mask
        if jnp.shape(m) != (T,):
            raise _shape_error(f"sensors[{k}].mask", jnp.shape(m), f"({T},)")
        check_mask(f"sensors[{k}].mask", m)
        m = jnp.asarray(m)
        masks.append(jnp.broadcast_to(m[:, None], (T, p)))
        ws.append(w)
    R = jax.vmap(jax.scipy.linalg.block_diag)(*Rs)
    return Emissions(jnp.concatenate(ws, 1), R, jnp.concatenate(masks, 1), jnp.concatenate(Hs, 1))
