"""A linear-Gaussian state space model as one NumPyro distribution over its observations.

Model (time axis as in :mod:`inference.kalman._types`, ``t = 0, ..., T-1``)::

    z_0 ~ N(m_0, P_0),   z_{t+1} = A_t z_t + b_t + N(0, Q_t),   w_t = H_t z_t + N(0, R_t)

:class:`LinearGaussianStateSpace` is a distribution over the observation sequence
``w_{0:T-1}`` (event shape ``(T, p)``) with the latent path integrated out: ``log_prob`` is the
Kalman marginal log-likelihood ``log p(w_{0:T-1}) = sum_t log N(w_t; H_t m_{t|t-1},
H_t P_{t|t-1} H_t^T + R_t)`` (the prediction-error decomposition of the Kalman filter, Kalman
1960; see Särkkä 2013, "Bayesian Filtering and Smoothing", on parameter estimation), so NUTS or
SVI on the parameters ``(m_0, P_0, A, b, Q, H, R)`` is exact inference with the latents
marginalised. ``sample`` draws ``(z, w)`` from the joint by ancestral sampling.
It is the NumPyro counterpart of TensorFlow Probability's ``LinearGaussianStateSpaceModel``.
All inference is delegated to :mod:`inference.kalman`.
"""

from functools import partial
from math import prod
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from numpyro.distributions import Distribution, constraints

from inference import kalman
from inference.kalman._validate import canonicalize


class _Model(NamedTuple):
    """The parameters in the Kalman layer's containers (``w`` supplied per call)."""

    prior: kalman.Gaussian
    dynamics: kalman.Dynamics
    R: Array
    H: Array | None
    mask: Array | None

    def emissions(self, w: Array) -> kalman.Emissions:
        return kalman.Emissions(w, self.R, self.mask, self.H)


# Many independent sequences or draws are mapped in chunks of this many (vmap inside a chunk,
# a loop over chunks): bounded memory, and on XLA:CPU (jaxlib 0.10.2) large vmapped batches of
# the dense Kalman kernels were seen to hang at random (``BlockUntilReady`` waiting forever with
# every worker thread idle), which chunks of 32 avoided in thousands of calls.
CHUNK = 32


def chunked_map(f, *xs):
    """``jax.vmap(f)(*xs)`` computed chunk by chunk (``lax.map`` with ``batch_size=CHUNK``)."""
    return jax.lax.map(lambda a: f(*a), xs, batch_size=CHUNK)


# Jitted once per shape: eager calls of the distribution's methods stay cheap; under an outer
# ``jit`` (MCMC, SVI) they are simply inlined.
@partial(jax.jit, static_argnames="parallel")
def _log_likelihood(model: _Model, w: Array, parallel: bool) -> Array:
    """``log p(w_n)`` for each of the sequences ``w`` ``(N, T, p)``."""

    def one(x):
        emissions = model.emissions(x)
        return kalman.filter(
            model.prior, model.dynamics, emissions, parallel=parallel
        ).log_likelihood

    return chunked_map(one, w)


@partial(jax.jit, static_argnames="parallel")
def _smoother(model: _Model, w: Array, parallel: bool) -> kalman.SmootherResult:
    return kalman.smoother(model.prior, model.dynamics, model.emissions(w), parallel=parallel)


@partial(jax.jit, static_argnames=("num_samples", "parallel"))
def _ffbs(key, model: _Model, w: Array, num_samples: int | None, parallel: bool):
    return kalman.ffbs(
        key,
        model.prior,
        model.dynamics,
        model.emissions(w),
        num_samples=num_samples,
        parallel=parallel,
    )


@partial(jax.jit, static_argnames="parallel")
def _prior_marginals(model: _Model, w: Array, parallel: bool) -> kalman.Gaussian:
    """``p(z_t)``: the filter's predictions with every step masked (``w`` only gives shapes)."""
    empty = model._replace(mask=jnp.zeros(w.shape[:1]))
    return kalman.filter(
        model.prior, model.dynamics, empty.emissions(w), parallel=parallel
    ).predicted


def _time_varying(model: _Model, T: int, p: int):
    """Dynamics with a leading ``T - 1`` axis, ``H`` and ``R`` with a leading ``T`` axis."""
    (m0, P0), (A, b, Q) = model.prior, model.dynamics
    d = m0.shape[0]
    diagonal = P0.ndim == 1
    cov = (d,) if diagonal else (d, d)
    dtype = jnp.result_type(float, m0, P0, A, Q, model.R)
    tv = lambda x, shape, n: jnp.broadcast_to(jnp.asarray(x, dtype), (n, *shape))
    dynamics = kalman.Dynamics(
        tv(A, cov, T - 1), tv(0.0 if b is None else b, (d,), T - 1), tv(Q, cov, T - 1)
    )
    R = tv(model.R, (p,) if diagonal else (p, p), T)
    H = None if diagonal else tv(jnp.eye(d) if model.H is None else model.H, (p, d), T)
    prior = kalman.Gaussian(m0.astype(dtype), P0.astype(dtype))
    return prior, dynamics, H, R


@partial(jax.jit, static_argnames=("shape", "num"))
def _sample_joint(key, model: _Model, shape: tuple[int, int], num: int):
    """``num`` ancestral draws ``(w, z)`` of the joint: ``(num, T, p)`` and ``(num, T, d)``."""
    T, p = shape
    prior, dynamics, H, R = _time_varying(model, T, p)
    chol_R = jnp.sqrt(R) if H is None else jnp.linalg.cholesky(R)

    def one(k):
        key_z, key_w = jax.random.split(k)
        z, _ = kalman.sample_chain(key_z, prior, dynamics)  # lax.scan over t = 0..T-1
        eps = jax.random.normal(key_w, (T, p), R.dtype)
        if H is None:
            return z + chol_R * eps, z
        return jnp.einsum("tpd,td->tp", H, z) + jnp.einsum("tpq,tq->tp", chol_R, eps), z

    return chunked_map(one, jax.random.split(key, num))


class LinearGaussianStateSpace(Distribution):
    """Observations of a linear-Gaussian SSM, latent path marginalised (event shape ``(T, p)``).

    Structure follows :mod:`inference.kalman`: a vector ``initial_cov`` ``(d,)`` selects the
    *diagonal* structure (``transition_matrix``, ``transition_cov`` and ``emission_cov`` are
    vectors of per-coordinate entries, ``emission_matrix`` must be ``None``, ``p == d``); a
    matrix ``(d, d)`` selects the *dense* structure (``emission_matrix`` ``(p, d)``, ``None``
    meaning identity). Dynamics are static or carry a leading time axis of length ``T - 1``
    (entry ``t`` maps ``z_t`` to ``z_{t+1}``); ``emission_matrix`` / ``emission_cov`` are static
    or carry a leading axis ``T``. Diagonal structure has one sensor (fuse several with the
    dense structure and :func:`inference.kalman.stack_sensors`).

    Supported shapes: ``batch_shape == ()``. ``log_prob`` accepts any leading sample dimensions
    ``(..., T, p)`` and maps over them; independent sequences are handled by
    ``numpyro.plate`` (which expands the distribution) or by ``jax.vmap`` over the constructor.
    The ``mask`` (``(T,)`` per step or ``(T, p)`` per entry; 1/True = observed) is fixed for the
    distribution and applies to every value scored; masked entries of a value are ignored and
    may be NaN. ``sample`` always returns complete draws (the mask describes what is observed,
    not what is generated).

    Shapes are checked at construction by the Kalman layer's own checks (abstractly, with
    ``jax.eval_shape``, so also under ``jit``); with ``validate_args=True`` (NumPyro's default)
    and concrete parameters the values (positive definite covariances, finite entries) are
    checked as well. Every failure is a ``ValueError``. Eager calls of ``log_prob``, ``sample``
    and the posterior helpers run jitted kernels (compiled once per shape).

    Args:
        initial_mean: ``m_0``, shape ``(d,)``.
        initial_cov: ``P_0``, ``(d,)`` (diagonal structure) or ``(d, d)`` (dense).
        transition_matrix: ``A``, static or with leading axis ``T - 1``.
        transition_cov: ``Q``, static or with leading axis ``T - 1``.
        emission_cov: ``R``, ``(p,)`` / ``(T, p)`` diagonal, ``(p, p)`` / ``(T, p, p)`` dense.
        num_steps: ``T``.
        transition_offset: ``b``, ``(d,)`` or ``(T - 1, d)``; ``None`` means zero.
        emission_matrix: ``H``, ``(p, d)`` or ``(T, p, d)`` (dense only); ``None`` is identity.
        mask: ``None`` (all observed), ``(T,)`` or ``(T, p)``.
        parallel: run the Kalman recursions with ``lax.associative_scan``.
        validate_args: NumPyro's flag; enables the value checks and the sample check in
            ``log_prob``.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    pytree_data_fields = (
        "initial_mean",
        "initial_cov",
        "transition_matrix",
        "transition_offset",
        "transition_cov",
        "emission_matrix",
        "emission_cov",
        "mask",
    )
    pytree_aux_fields = ("num_steps", "diagonal", "parallel")

    def __init__(
        self,
        initial_mean: Array,
        initial_cov: Array,
        transition_matrix: Array,
        transition_cov: Array,
        emission_cov: Array,
        num_steps: int,
        *,
        transition_offset: Array | None = None,
        emission_matrix: Array | None = None,
        mask: Array | None = None,
        parallel: bool = False,
        validate_args: bool | None = None,
    ):
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        asarray = lambda x: None if x is None else jnp.asarray(x)
        self.initial_mean = asarray(initial_mean)
        self.initial_cov = asarray(initial_cov)
        self.transition_matrix = asarray(transition_matrix)
        self.transition_offset = asarray(transition_offset)
        self.transition_cov = asarray(transition_cov)
        self.emission_matrix = asarray(emission_matrix)
        self.emission_cov = asarray(emission_cov)
        self.mask = asarray(mask)
        self.num_steps = num_steps
        self.parallel = bool(parallel)
        if self.initial_mean.ndim != 1:
            raise ValueError(
                f"initial_mean has shape {self.initial_mean.shape}, expected (d,): only "
                "batch_shape () is supported; batch with numpyro.plate or jax.vmap"
            )
        d = self.initial_mean.shape[0]
        self.diagonal = self.initial_cov.ndim == 1
        if self.diagonal:
            if self.emission_matrix is not None:
                raise ValueError("emission_matrix must be None for diagonal structure (identity)")
            if self.emission_cov.ndim not in (1, 2):
                raise ValueError(
                    f"emission_cov has shape {self.emission_cov.shape}, expected ({d},) or "
                    f"({num_steps}, {d}) for diagonal structure (one sensor)"
                )
            p = d
        elif self.emission_matrix is not None:
            if self.emission_matrix.ndim not in (2, 3):
                raise ValueError(
                    f"emission_matrix has shape {self.emission_matrix.shape}, expected (p, {d}) "
                    f"or ({num_steps}, p, {d})"
                )
            p = self.emission_matrix.shape[-2]
        else:
            p = d
        super().__init__(batch_shape=(), event_shape=(num_steps, p), validate_args=validate_args)
        # The Kalman layer's own checks: shapes always (abstractly, nothing is computed), values
        # too when validating concrete arrays.
        w = jax.ShapeDtypeStruct(self.event_shape, jnp.result_type(float))
        model = self._model()
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(model))
        if self._validate_args and not traced:
            canonicalize(model.prior, model.dynamics, model.emissions(jnp.zeros(w.shape, w.dtype)))
        else:
            check = lambda m, w: canonicalize(m.prior, m.dynamics, m.emissions(w))[1]
            jax.eval_shape(check, model, w)

    def _model(self) -> _Model:
        return _Model(
            kalman.Gaussian(self.initial_mean, self.initial_cov),
            kalman.Dynamics(self.transition_matrix, self.transition_offset, self.transition_cov),
            self.emission_cov,
            self.emission_matrix,
            self.mask,
        )

    # --- Distribution interface -------------------------------------------------------------

    def sample_with_intermediates(
        self, key: Array, sample_shape: tuple[int, ...] = ()
    ) -> tuple[Array, list[Array]]:
        """Ancestral draws from the joint: ``(w, [z])`` with observations ``w``
        ``sample_shape + (T, p)`` and the latent paths ``z`` ``sample_shape + (T, d)`` behind
        them (``z_0`` from the prior, ``z_{t+1} | z_t`` by the dynamics, ``w_t | z_t``)."""
        w, z = _sample_joint(key, self._model(), self.event_shape, prod(sample_shape))
        return w.reshape(sample_shape + w.shape[1:]), [z.reshape(sample_shape + z.shape[1:])]

    def sample(self, key: Array, sample_shape: tuple[int, ...] = ()) -> Array:
        """Observation sequences ``sample_shape + (T, p)`` drawn ancestrally from the joint."""
        return self.sample_with_intermediates(key, sample_shape)[0]

    def log_prob(self, value: Array, intermediates=None) -> Array:
        """Kalman marginal log-likelihood ``log p(w_{0:T-1})`` of each sequence in ``value``.

        ``value`` has shape ``(..., T, p)``; the result has shape ``(...)``. ``intermediates``
        (the latent path of :meth:`sample_with_intermediates`) are ignored: the density is the
        marginal one.
        """
        value = jnp.asarray(value)
        if value.shape[-2:] != self.event_shape:
            raise ValueError(f"value has shape {value.shape}, expected (..., *{self.event_shape})")
        if self._validate_args:
            self._validate_sample(value)
        lead = value.shape[:-2]
        flat = value.reshape((prod(lead), *self.event_shape))
        return _log_likelihood(self._model(), flat, self.parallel).reshape(lead)

    def _validate_sample(self, value: Array) -> Array:
        """Support check of the observed entries only (masked ones may hold NaN)."""
        if self.mask is not None:
            m = self.mask.reshape(self.mask.shape + (1,) * (2 - self.mask.ndim)).astype(bool)
            value = jnp.where(m, value, 0.0)
        return super()._validate_sample(value)

    @property
    def mean(self) -> Array:
        """``E[w_t] = H_t E[z_t]``, shape ``(T, p)``."""
        model = self._model()
        m = _prior_marginals(model, jnp.zeros(self.event_shape), self.parallel).mean
        if self.diagonal:
            return m
        _, _, H, _ = _time_varying(model, *self.event_shape)
        return jnp.einsum("tpd,td->tp", H, m)

    @property
    def variance(self) -> Array:
        """``Var[w_t] = diag(H_t Cov[z_t] H_t^T + R_t)``, shape ``(T, p)``."""
        model = self._model()
        P = _prior_marginals(model, jnp.zeros(self.event_shape), self.parallel).cov
        _, _, H, R = _time_varying(model, *self.event_shape)
        if self.diagonal:
            return P + R
        return jnp.diagonal(H @ P @ jnp.swapaxes(H, -1, -2) + R, axis1=-2, axis2=-1)

    # --- exact posterior of the latents -----------------------------------------------------

    def posterior(self, value: Array) -> kalman.SmootherResult:
        """Exact posterior ``p(z_{0:T-1} | w_{0:T-1})`` of one sequence ``value`` ``(T, p)``
        (mask applied): :func:`inference.kalman.smoother`'s result. Its ``smoothed`` beliefs
        are the posterior marginals and its ``log_likelihood`` equals ``log_prob(value)``."""
        return _smoother(self._model(), jnp.asarray(value), self.parallel)

    def posterior_sample(
        self, key: Array, value: Array, num_samples: int | None = None
    ) -> tuple[Array, Array]:
        """Latent paths from the exact posterior given one sequence ``value`` by forward
        filtering, backward sampling (:func:`inference.kalman.ffbs`, the backward pass of
        :func:`inference.kalman.posterior_sample` without the smoothing pass).

        Returns:
            ``(z, log_prob)``: paths ``(num_samples, T, d)`` (no sample axis for ``None``) and
            their log-densities under the posterior.
        """
        return _ffbs(key, self._model(), jnp.asarray(value), num_samples, self.parallel)
