"""Filter, smoother, conditionals and log-likelihood equal brute-force Gaussian conditioning
of the whole joint ``(z_{0:T-1}, w_{0:T-1})``, for both drivers and both structures."""

from functools import partial

import jax
import numpy as np
from hypothesis import given

from inference import kalman
from tests.kalman_models import specs
from tests.kalman_reference import reference

_smoother = {p: jax.jit(partial(kalman.smoother, parallel=p)) for p in (False, True)}
_smoothed_dynamics = jax.jit(kalman.smoothed_dynamics)


def _dense(x, diagonal):
    """Expand diagonal-structure covariances/gains (..., d) to matrices (..., d, d)."""
    x = np.asarray(x)
    return x[..., :, None] * np.eye(x.shape[-1]) if diagonal else x


@given(spec=specs())
def test_kalman_matches_brute_force_conditioning(spec):
    case = spec.build()
    ref = reference(case.dense)
    diag = case.diagonal
    # float64 throughout; ill-conditioned variances span 1e-4..1e3, which costs the
    # brute-force reference itself some digits.
    tol = 1e-5 if spec.ill else 1e-8
    scale = max(1.0, float(np.abs(ref.posterior_cov).max()), float(np.abs(ref.smoothed_mean).max()))
    ll_scale = max(1.0, float(np.abs(ref.log_likelihoods).max()))

    def close(actual, expected, s=scale):
        np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol * s)

    for parallel in (False, True):
        post = _smoother[parallel](case.prior, case.dynamics, case.emissions)
        f = post.filtered
        close(f.predicted.mean, ref.predicted_mean)
        close(_dense(f.predicted.cov, diag), ref.predicted_cov)
        close(f.filtered.mean, ref.filtered_mean)
        close(_dense(f.filtered.cov, diag), ref.filtered_cov)
        close(post.smoothed.mean, ref.smoothed_mean)
        close(_dense(post.smoothed.cov, diag), ref.smoothed_cov)
        close(_dense(post.cross_cov, diag), ref.cross_cov)
        close(f.log_likelihoods, ref.log_likelihoods, ll_scale)
        close(post.log_likelihood, ref.log_likelihoods.sum(), ll_scale * spec.T)
        # backward conditionals q(z_t | z_{t+1}, o_{0:t}) and smoothed dynamics
        # q(z_{t+1} | z_t, o_{0:T-1}): gain, offset, covariance
        for got, want in zip(post.backward, ref.backward, strict=True):
            close(_dense(got, diag) if want.ndim == 3 else got, want)
        for got, want in zip(_smoothed_dynamics(post), ref.forward, strict=True):
            close(_dense(got, diag) if want.ndim == 3 else got, want)
