"""Variational hierarchical prior (VHP): a learned empirical-Bayes prior on the initial state,
the model's part (its networks and its sites).

Klushyn et al. (2019, "Learning Hierarchical Priors in VAEs", NeurIPS) and, for state space
models, Klushyn et al. (2021, "Latent Matters: Learning Deep State-Space Models", Sec. 3.1,
Eq. 6). The prior of ``z`` (the initial state ``z_0`` of an SSM) is a continuous mixture

    p_psi0(z) = int N(z; mu(zeta), diag sigma^2(zeta)) N(zeta; 0, I) dzeta,

learned with an amortised posterior ``q_phi0(zeta | z) = N(nu(z), diag s^2(z))``. A model
holds both networks (:class:`VHP`) and samples ``zeta`` then ``z`` (:func:`sample_prior`);
the bound ``F_VHP(z) <= log p_psi0(z)`` that replaces ``log p(z_0)`` in an objective, and the
guide's side ``zeta ~ q(zeta | z)``, are inference's (:mod:`inference.objectives.vhp`).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx

from . import nets

__all__ = ["VHP", "GaussianFn", "diagonal_normal", "sample_prior"]

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


def diagonal_normal(mean: jax.Array, var: jax.Array) -> dist.Distribution:
    """``N(mean, diag var)`` with event ``(d,)``."""
    return dist.Normal(mean, jnp.sqrt(var)).to_event(1)


def sample_prior(
    prior: GaussianFn, zeta_dim: int, batch_shape: tuple, *, site: str, zeta_site: str = "zeta"
) -> jax.Array:
    """Model side: ``zeta ~ N(0, I)`` (site ``zeta_site``), then ``z ~ p(z | zeta)`` (site
    ``site``). Call inside the plates that give ``batch_shape``."""
    dtype = nets.default_param_dtype()
    zeta = numpyro.sample(
        zeta_site, dist.Normal(jnp.zeros((*batch_shape, zeta_dim), dtype), 1.0).to_event(1)
    )
    return numpyro.sample(site, diagonal_normal(*prior(zeta)))
