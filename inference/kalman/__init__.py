"""Pure-JAX Kalman inference for latent linear-Gaussian state space models.

Model (time-axis convention in :mod:`inference.kalman._types`)::

    z_0 ~ N(m_0, P_0),   z_{t+1} = A_t z_t + b_t + N(0, Q_t),   w_t^(k) = H^(k) z_t + N(0, R_t^(k))

Diagonal structure (vectors for ``P_0, A_t, Q_t, R_t``; the deep models' case, elementwise and
matrix-inverse free) or dense structure (matrices; LGSSM, L-VSSF), chosen by ``P_0``'s shape.
The parallel drivers (``parallel=True``) run one associative kernel per operation by
``lax.associative_scan``; the sequential filter scans the single-step :func:`predict` and
:func:`update`, which models also call for their online belief step. Batch with ``jax.vmap``.

Example::

    from inference import kalman
    post = kalman.smoother(kalman.Gaussian(m0, P0), kalman.Dynamics(A, b, Q),
                           kalman.Emissions(w, R, mask))
    post.smoothed.mean, post.log_likelihood

The square-root (Cholesky-factor) form of the dense kernels, for float32 on ill-conditioned
models, is :mod:`inference.kalman.sqrt` (``kalman.sqrt.smoother`` etc.).
"""

from . import _lapack_guard  # noqa: F401  (before anything compiles: see its docstring)
from ._checked import checked
from ._types import (
    Dynamics,
    Emissions,
    FilterResult,
    Gaussian,
    LinearGaussian,
    SmootherResult,
)
from ._validate import stack_sensors
from .filtering import filter, one_step_conditionals
from .sampling import chain_log_prob, ffbs, posterior_sample, sample_chain
from .smoothing import backward_conditionals, expected_kl, smoothed_dynamics, smoother
from .step import predict, update

__all__ = [
    "Dynamics",
    "Emissions",
    "FilterResult",
    "Gaussian",
    "LinearGaussian",
    "SmootherResult",
    "backward_conditionals",
    "chain_log_prob",
    "checked",
    "expected_kl",
    "ffbs",
    "filter",
    "one_step_conditionals",
    "posterior_sample",
    "predict",
    "sample_chain",
    "smoothed_dynamics",
    "smoother",
    "sqrt",
    "stack_sensors",
    "update",
]

from . import sqrt  # noqa: E402  (the square-root form: a subpackage over the modules above)
