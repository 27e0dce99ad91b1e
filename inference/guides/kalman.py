"""Guide families built on the exact Kalman posterior of a model's latent LGSSM.

Both read the model only through ``model.structure(...)`` (:class:`pssm.core.LinearGaussian`)
and sample the model's latent sites ``"z_0"`` and ``"z"``.

* :func:`kalman_smoothing` (VRKN, KalMamba): the smoothing posterior sampled *forward* through
  its smoothed dynamics,

      q(z_{0:T-1}) = q(z_0 | o) prod_t q(z_{t+1} | z_t, o)        (VRKN Eq. 4),

  so that under ``TraceMeanField_ELBO`` each step contributes the analytic
  ``KL(q(z_{t+1} | z_t, o) || p(z_{t+1} | z_t))`` at one sampled ``z_t``: the VRKN bound.
* :func:`backward_sampling` (VSSF): the same posterior sampled *backwards*,

      q(z_{0:T-1}) = q(z_{T-1} | o) prod_t q(z_t | z_{t+1}, o_{0:t})   (L-VSSF Eq. 4-5),

  which needs only the filter and is scored with ``Trace_ELBO``.

For a model whose structure is its exact likelihood both guides are the exact posterior, so
the ELBO equals ``log p(o)``.
"""

from functools import partial

import jax

from inference import kalman
from pssm.core import LinearGaussian, require, sample_latent_path


def kalman_smoothing(model, *, parallel: bool = False):
    """Guide: the exact smoothing posterior of ``model``'s latent LGSSM, sampled forward.

    Args:
        model: a NumPyro model carrying ``model.structure`` (:class:`pssm.core.LinearGaussian`,
            declared with :func:`pssm.core.linear_gaussian`).
        parallel: run filter and smoother with ``lax.associative_scan``.
    """
    require(model, LinearGaussian, "kalman_smoothing")

    def guide(obs, *args, rewards=None, **kwargs):  # rewards: scored by the model only
        s = model.structure(obs, *args, **kwargs)
        post = jax.vmap(partial(kalman.smoother, parallel=parallel))(*s)
        forward = jax.vmap(kalman.smoothed_dynamics)(post)
        first = kalman.Gaussian(post.smoothed.mean[:, 0], post.smoothed.cov[:, 0])
        return sample_latent_path(first, forward)

    return guide


def backward_sampling(model, *, parallel: bool = False):
    """Guide: ``q(z_{T-1} | o) prod_t q(z_t | z_{t+1}, o_{0:t})`` from the forward filter
    (forward-filtering backward-sampling as a NumPyro guide)."""
    require(model, LinearGaussian, "backward_sampling")

    def guide(obs, *args, rewards=None, **kwargs):  # rewards: scored by the model only
        s = model.structure(obs, *args, **kwargs)
        filt = jax.vmap(partial(kalman.filter, parallel=parallel))(*s)
        back = jax.vmap(kalman.backward_conditionals)(filt, s.dynamics)
        last = kalman.Gaussian(filt.filtered.mean[:, -1], filt.filtered.cov[:, -1])
        return sample_latent_path(last, back, reverse=True)

    return guide
