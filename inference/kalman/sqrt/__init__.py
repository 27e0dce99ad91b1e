"""Square-root (Cholesky-factor) form of the dense Kalman kernels, for float32 robustness.

The same model, time-axis convention, masks and multi-sensor stacking as
:mod:`inference.kalman` (dense structure), with every covariance replaced by a square root
``S`` (``S S^T = Sigma``): the user passes square roots of ``P_0, Q_t, R_t``, the kernels return
lower-triangular Cholesky factors and never form a covariance they would have to factorise
again. Every step is a QR factorisation of a joint square root (:mod:`.step`; Yaghoobi,
Corenflos, Hassan & Särkkä 2022, "Parallel square-root statistical linear regression for
inference in nonlinear state space models"), so predicted, filtered and smoothed covariances are
positive semi-definite by construction. In float32 with noise spanning ``1e-6..1e6`` this form
stays finite where the covariance form's ``P - U^T U`` loses positive definiteness and its next
Cholesky factorisation returns NaN.

Sequential (``lax.scan``) and parallel (``lax.associative_scan`` over square-root filtering
elements and affine-Gaussian compositions) drivers, as the covariance form. Example::

    from inference import kalman
    post = kalman.sqrt.smoother(
        kalman.sqrt.SqrtGaussian(m0, chol_P0),
        kalman.sqrt.SqrtDynamics(A, b, chol_Q),
        kalman.sqrt.SqrtEmissions(w, chol_R, mask, H),
    )
    post.smoothed.chol, post.log_likelihood, kalman.sqrt.from_sqrt(post)  # covariance form

Results come in the covariance form's containers (:class:`~inference.kalman.FilterResult`,
:class:`~inference.kalman.SmootherResult`) holding :class:`SqrtGaussian` /
:class:`SqrtLinearGaussian` where those hold covariances; ``cross_cov`` stays a matrix.
"""

from ._types import (
    SqrtDynamics,
    SqrtEmissions,
    SqrtGaussian,
    SqrtLinearGaussian,
    from_sqrt,
    stack_sensors,
    to_sqrt,
)
from .filtering import filter
from .sampling import chain_log_prob, ffbs, posterior_sample, sample_chain
from .smoothing import backward_conditionals, smoothed_dynamics, smoother
from .step import predict, update

__all__ = [
    "SqrtDynamics",
    "SqrtEmissions",
    "SqrtGaussian",
    "SqrtLinearGaussian",
    "backward_conditionals",
    "chain_log_prob",
    "ffbs",
    "filter",
    "from_sqrt",
    "posterior_sample",
    "predict",
    "sample_chain",
    "smoothed_dynamics",
    "smoother",
    "stack_sensors",
    "to_sqrt",
    "update",
]
