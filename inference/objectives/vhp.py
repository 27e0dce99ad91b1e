"""Variational hierarchical prior (VHP): a learned empirical-Bayes prior on the initial state,
inference's part (the bound and the guide's site); the networks and the model's sites are
:mod:`pssm.vhp`'s.

Klushyn et al. (2019, "Learning Hierarchical Priors in VAEs", NeurIPS) and, for state space
models, Klushyn et al. (2021, "Latent Matters: Learning Deep State-Space Models", Sec. 3.1,
Eq. 6). The prior of ``z`` (the initial state ``z_0`` of an SSM) is a continuous mixture

    p_psi0(z) = int N(z; mu(zeta), diag sigma^2(zeta)) N(zeta; 0, I) dzeta,

learned with an amortised posterior ``q_phi0(zeta | z) = N(nu(z), diag s^2(z))`` through the
VAE-like bound

    F_VHP(z) = E_{q(zeta|z)}[log p(z|zeta) + log p(zeta) - log q(zeta|z)]
             = E_{q(zeta|z)}[log p(z|zeta)] - KL(q(zeta|z) || N(0, I))   <=   log p_psi0(z),

with equality iff ``q(zeta|z)`` is the exact posterior ``p(zeta|z)``. Used in place of
``log p(z_0)`` the bound can only lower the ELBO (Latent Matters, App. A.2: the rate grows), so
the objective stays a lower bound on ``log p(x)``. With linear networks (no hidden layer) and a
constant variance the prior is the Gaussian ``N(c, W W^T + sigma^2 I)`` and the bound is tight
at the linear-Gaussian exact posterior (checked in ``tests/test_ekvae.py``).

Two ways to use it:

* inside NumPyro programs: :func:`pssm.vhp.sample_prior` in the model (sites ``zeta`` then
  ``z``) and :func:`sample_posterior` in the guide (site ``zeta`` given the guide's ``z``); any
  ELBO then estimates ``F_VHP`` as part of the model's ELBO;
* as a number: :func:`vhp_bound`, e.g. inside the EKVAE rate (Latent Matters Eq. 18:
  :class:`inference.objectives.EKVAEBound` hands it to the model's ``bound`` as
  ``prior_bound``).
"""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from pssm.vhp import GaussianFn
from pssm.vhp import diagonal_normal as _normal

__all__ = ["sample_posterior", "vhp_bound"]


def vhp_bound(
    key: jax.Array,
    prior: GaussianFn,
    posterior: GaussianFn,
    z: jax.Array,
    *,
    num_samples: int = 1,
    analytic_kl: bool = True,
) -> jax.Array:
    """Monte Carlo estimate of ``F_VHP(z) <= log p(z)`` with reparameterised ``zeta``.

    Args:
        key: PRNG key.
        prior: ``zeta -> (mean, var)`` of ``p(z | zeta)`` (a network or a registered one).
        posterior: ``z -> (mean, var)`` of ``q(zeta | z)``.
        z: points ``(..., d)``.
        num_samples: ``zeta`` samples averaged per point.
        analytic_kl: use ``E_q log p(z|zeta) - KL(q || N(0, I))`` (same expectation, lower
            variance) instead of the plain ``log p(z|zeta) + log p(zeta) - log q(zeta|z)``.

    Returns:
        ``(...)``: the estimate per point.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    q_mean, q_var = posterior(z)
    eps = jax.random.normal(key, (num_samples, *q_mean.shape), q_mean.dtype)
    zeta = q_mean + jnp.sqrt(q_var) * eps
    p_mean, p_var = prior(zeta)
    log_lik = jnp.mean(_normal(p_mean, p_var).log_prob(z), axis=0)
    if analytic_kl:
        kl = 0.5 * jnp.sum(q_var + q_mean**2 - 1.0 - jnp.log(q_var), axis=-1)
        return log_lik - kl
    standard = dist.Normal(jnp.zeros_like(q_mean), 1.0).to_event(1)
    ratio = standard.log_prob(zeta) - _normal(q_mean, q_var).log_prob(zeta)
    return log_lik + jnp.mean(ratio, axis=0)


def sample_posterior(posterior: GaussianFn, z: jax.Array, *, zeta_site: str = "zeta") -> jax.Array:
    """Guide side: ``zeta ~ q(zeta | z)`` (site ``zeta_site``), inside the model's plates."""
    return numpyro.sample(zeta_site, _normal(*posterior(z)))
