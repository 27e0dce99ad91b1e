"""Containers of the Kalman core: plain NamedTuples, no behaviour.

Time-axis convention (the one place it is written down)
-------------------------------------------------------
A sequence has ``T`` steps indexed ``t = 0, ..., T-1``::

    z_0 ~ N(m_0, P_0)                                  prior on the first state
    z_{t+1} = A_t z_t + b_t + N(0, Q_t)                 t = 0, ..., T-2  (T-1 transitions)
    w_t^(k) = H^(k) z_t + N(0, R_t^(k))                 t = 0, ..., T-1  (every step observed,
                                                        unless its mask says otherwise)

so time-varying dynamics arrays have a leading axis of length ``T - 1`` (entry ``t`` maps
``z_t`` to ``z_{t+1}``; a model that computes ``(A_t, b_t, Q_t)`` from the action ``a_t`` at every
step drops the last one), emissions have a leading axis of length ``T``, and smoother outputs
that live between steps (cross-covariances, forward and backward conditionals) have length
``T - 1``. Static parameters simply omit the time axis; whether an array is time-varying is
decided by its number of dimensions alone, never by comparing sizes.

Covariance structure is decided by ``P_0``: a vector ``(d,)`` means *diagonal* (every covariance
and every ``A_t`` is a vector of per-coordinate entries, all operations are elementwise), a
matrix ``(d, d)`` means *dense*.
"""

from typing import NamedTuple

from jax import Array


class Gaussian(NamedTuple):
    """``N(mean, cov)``; ``cov`` has shape ``(..., d)`` (diagonal) or ``(..., d, d)`` (dense)."""

    mean: Array
    cov: Array


class LinearGaussian(NamedTuple):
    """Affine-Gaussian conditional ``x' | x ~ N(A x + b, Q)``.

    Used for the model's dynamics, the smoothed (forward) dynamics ``q(z_{t+1} | z_t, o_{0:T-1})``
    and the backward conditionals ``q(z_t | z_{t+1}, o_{0:t})``. Diagonal structure stores ``A``
    and ``Q`` as vectors.
    """

    A: Array
    b: Array
    Q: Array


Dynamics = LinearGaussian


class Emissions(NamedTuple):
    """Latent observations ``w_t^(k) = H^(k) z_t + N(0, R_t^(k))`` with missing-data masks.

    Diagonal structure (``H`` must be ``None``: identity):
        ``w``: ``(T, d)`` for one sensor or ``(T, K, d)`` for ``K`` sensors; ``R``: ``w``'s shape
        (time-varying) or ``w``'s shape without the leading time axis (static).
        A sensor that sees only some coordinates (a selection ``H``) marks the others missing.
    Dense structure:
        ``w``: ``(T, p)``, ``H``: ``(p, d)`` or ``(T, p, d)`` (``None`` means identity, ``p == d``),
        ``R``: ``(p, p)`` or ``(T, p, p)``. Several sensors are stacked rows with a block-diagonal
        ``R``; see :func:`inference.kalman.stack_sensors`.
    ``mask``: ``None`` (all observed) or a boolean / 0-1 array whose shape is a prefix of ``w``'s
        shape: ``(T,)`` per step, ``(T, K)`` per step and sensor, ``w.shape`` per entry. Masked
        entries of ``w`` may hold anything, NaN included; a fully masked step is a pure prediction.
    """

    w: Array
    R: Array
    mask: Array | None = None
    H: Array | None = None


class FilterResult(NamedTuple):
    """Output of :func:`inference.kalman.filter`.

    Attributes:
        predicted: beliefs ``p(z_t | o_{0:t-1})``, leading axis ``T`` (``t = 0`` is the prior).
        filtered: beliefs ``p(z_t | o_{0:t})``, leading axis ``T``.
        log_likelihoods: ``log p(o_t | o_{0:t-1})`` per step, shape ``(T,)``.
        log_likelihood: their sum, ``log p(o_{0:T-1})``.
    """

    predicted: Gaussian
    filtered: Gaussian
    log_likelihoods: Array
    log_likelihood: Array


class SmootherResult(NamedTuple):
    """Output of :func:`inference.kalman.smoother`.

    Attributes:
        filtered: the forward pass, as returned by :func:`inference.kalman.filter`.
        smoothed: beliefs ``p(z_t | o_{0:T-1})``, leading axis ``T``.
        cross_cov: ``Cov(z_t, z_{t+1} | o_{0:T-1})``, leading axis ``T - 1`` (for diagonal
            structure the per-coordinate covariances).
        backward: backward conditionals ``q(z_t | z_{t+1}, o_{0:t}) = N(A z_{t+1} + b, Q)``
            (``A`` is the RTS gain), leading axis ``T - 1``.
    """

    filtered: FilterResult
    smoothed: Gaussian
    cross_cov: Array
    backward: LinearGaussian

    @property
    def log_likelihood(self) -> Array:
        """Total marginal log-likelihood ``log p(o_{0:T-1})``."""
        return self.filtered.log_likelihood
