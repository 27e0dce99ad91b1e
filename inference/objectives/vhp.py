"""Variational hierarchical prior (VHP): a learned empirical-Bayes prior on the initial state.

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

* inside NumPyro programs: :func:`sample_prior` in the model (sites ``zeta`` then ``z``) and
  :func:`sample_posterior` in the guide (site ``zeta`` given the guide's ``z``); any ELBO then
  estimates ``F_VHP`` as part of the model's ELBO;
* as a number: :func:`vhp_bound`, e.g. inside the EKVAE rate (Latent Matters Eq. 18).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx

from pssm import nets

GaussianFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


class VHP(nnx.Module):
    """The two networks of a VHP: ``prior`` ``zeta -> (mu, sigma^2)`` of ``p(z | zeta)`` and
    ``posterior`` ``z -> (nu, s^2)`` of ``q(zeta | z)`` (both :class:`pssm.nets.GaussianMLP`;
    ``hidden=()`` makes them affine)."""

    def __init__(
        self,
        latent_dim: int,
        zeta_dim: int,
        hidden: Sequence[int] = (64,),
        *,
        min_var: float = 1e-4,
        init_var: float = 1.0,
        activation=nnx.elu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        if latent_dim < 1 or zeta_dim < 1:
            raise ValueError(f"need latent_dim, zeta_dim >= 1, got {latent_dim}, {zeta_dim}")
        kw = dict(
            min_var=min_var,
            init_var=init_var,
            activation=activation,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.prior = nets.GaussianMLP(zeta_dim, hidden, latent_dim, **kw)
        self.posterior = nets.GaussianMLP(latent_dim, hidden, zeta_dim, **kw)
        self.latent_dim, self.zeta_dim = latent_dim, zeta_dim


def _normal(mean, var):
    return dist.Normal(mean, jnp.sqrt(var)).to_event(1)


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


def sample_prior(
    prior: GaussianFn, zeta_dim: int, batch_shape: tuple, *, site: str, zeta_site: str = "zeta"
) -> jax.Array:
    """Model side: ``zeta ~ N(0, I)`` (site ``zeta_site``), then ``z ~ p(z | zeta)`` (site
    ``site``). Call inside the plates that give ``batch_shape``."""
    dtype = nets.default_param_dtype()
    zeta = numpyro.sample(
        zeta_site, dist.Normal(jnp.zeros((*batch_shape, zeta_dim), dtype), 1.0).to_event(1)
    )
    return numpyro.sample(site, _normal(*prior(zeta)))


def sample_posterior(posterior: GaussianFn, z: jax.Array, *, zeta_site: str = "zeta") -> jax.Array:
    """Guide side: ``zeta ~ q(zeta | z)`` (site ``zeta_site``), inside the model's plates."""
    return numpyro.sample(zeta_site, _normal(*posterior(z)))
