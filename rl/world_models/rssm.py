"""The RSSM (PlaNet / Dreamer) as a :class:`rl.world_model.WorldModel`, on vectors and images.

Belief: a sample of the RSSM state, ``(h_t, z_t)`` (Hafner et al. 2019, "Learning Latent
Dynamics for Planning from Pixels", Fig. 2c), plus a flag marking the first step of an episode:

    observe    z_t ~ q(z_t | h_t, e_t, m_t)   the amortised filtering posterior on the embedded
                                             observation (:mod:`inference.guides.rssm_filtering`:
                                             conv encoder for images, vectors as they are;
                                             zeros and flag 0 where a modality is masked), h kept
    imagine    h_{t+1} = GRU(h_t, MLP([z_t, a_t])),  z_{t+1} ~ p(z_{t+1} | h_{t+1})
    features   [h_t, z_t]

With MC dropout (``mc_dropout > 0``, :func:`pssm.rssm.rssm`) ``imagine`` draws its dropout
masks from its key: each key (e.g. each PlaNet candidate's) samples other dynamics, the same key
the same ones. The model trains on ``-ELBO`` with the per-step analytic KL of
``TraceMeanField_ELBO`` (the RSSM objective) unless another ELBO is given.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO

from inference.guides.rssm_filtering import rssm_filtering
from inference.training import elbo_objective
from pssm.locally_linear import event_shape
from pssm.observations import step_observations
from pssm.rssm import rssm

from ..world_model import WorldModel, substituted_heads


class RSSMBelief(NamedTuple):
    """``h`` ``(B, deter)``, ``z`` ``(B, stoch)``, ``first`` ``(B,)``: no observation seen yet."""

    h: jax.Array
    z: jax.Array
    first: jax.Array


def rssm_model_and_guide(
    obs_dims,
    action_dim,
    *,
    stoch,
    deter,
    hidden,
    posterior_hidden=None,
    min_var=0.01,
    obs_var=1.0,
    mc_dropout=0.0,
    conv_depth=32,
    image_bits=5,
    embed_features=None,
    seed=0,
):
    """The NumPyro RSSM with a reward head and its amortised filtering guide (the pair that
    :func:`rssm_world_model` trains; the same arguments give the same parameter sites)."""
    model = rssm(
        obs_dims, action_dim, stoch, deter, hidden, min_var=min_var, obs_var=obs_var,
        reward=True, mc_dropout=mc_dropout, conv_depth=conv_depth, image_bits=image_bits,
        seed=seed,
    )  # fmt: skip
    guide = rssm_filtering(
        model, hidden=posterior_hidden or hidden, latent_dim=stoch, min_var=min_var,
        conv_depth=conv_depth, embed_features=embed_features, seed=seed + 1,
    )  # fmt: skip
    return model, guide


def rssm_world_model(
    obs_dims: int | tuple[int, ...] | Mapping[str, int | tuple[int, ...]],
    action_dim: int,
    *,
    stoch: int = 30,
    deter: int = 200,
    hidden: int = 200,
    posterior_hidden: int | None = None,
    min_var: float = 0.01,
    obs_var: float = 1.0,
    mc_dropout: float = 0.0,
    conv_depth: int = 32,
    image_bits: int = 5,
    embed_features: int | None = None,
    elbo=None,
    seed: int = 0,
) -> WorldModel:
    """Build an RSSM with a reward head and its filtering guide, as a world model.

    Args:
        obs_dims: one modality's shape (``p``, or ``(H, W, C)`` for ``uint8`` or preprocessed
            float images), or ``{modality: shape}`` (e.g. ``{"image": (64, 64, 3), "proprio": 5}``).
        action_dim: ``u``.
        stoch, deter, hidden: RSSM sizes (PlaNet/Dreamer: 30, 200, 200).
        posterior_hidden: hidden width of the posterior network (default ``hidden``).
        min_var: floor of prior and posterior variances.
        obs_var: fixed decoder variance (per pixel in the preprocessed scale for images).
        mc_dropout: MC-dropout rate of the deterministic path and prior (``0``: none).
        conv_depth, image_bits, embed_features: image encoder/decoder width, colour depth and
            optional embedding head (see :func:`pssm.rssm.rssm`,
            :func:`inference.guides.rssm_filtering.rssm_filtering`).
        elbo: NumPyro ELBO (default ``TraceMeanField_ELBO()``: analytic per-step KL).
        seed: network initialisation.
    """
    model, guide = rssm_model_and_guide(
        obs_dims, action_dim, stoch=stoch, deter=deter, hidden=hidden,
        posterior_hidden=posterior_hidden, min_var=min_var, obs_var=obs_var,
        mc_dropout=mc_dropout, conv_depth=conv_depth, image_bits=image_bits,
        embed_features=embed_features, seed=seed,
    )  # fmt: skip
    objective = elbo_objective(model, guide, elbo or TraceMeanField_ELBO())
    shapes = {k: event_shape(s) for k, s in model.obs_dims.items()}
    names = list(shapes)

    def init_belief(params, batch_size):
        dtype = jnp.result_type(float)
        return RSSMBelief(
            jnp.zeros((batch_size, deter), dtype),
            jnp.zeros((batch_size, stoch), dtype),
            jnp.ones((batch_size,), bool),
        )

    def observe(params, key, belief, obs, mask=None):
        clean, m = step_observations(model.preprocess(obs), mask, names)
        with handlers.substitute(data=params):
            e = guide.embedding(shapes)(clean, m).astype(belief.h.dtype)
            seen = [belief.h, e, m.astype(e.dtype), belief.first[:, None].astype(e.dtype)]
            x = jnp.concatenate(seen, axis=-1)
            mu, var = guide.posterior(x.shape[-1])(x)
        z = mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape, mu.dtype)
        return RSSMBelief(belief.h, z, jnp.zeros_like(belief.first))

    def imagine(params, key, belief, action):
        k_path = k_prior = None
        if model.mc_dropout:
            key, k_path, k_prior = jax.random.split(key, 3)
        with handlers.substitute(data=params):
            h = model.deterministic()(belief.h, belief.z, action.astype(belief.h.dtype), k_path)
            mu, var = model.prior()(h, k_prior)
        z = mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape, mu.dtype)
        return RSSMBelief(h, z, jnp.zeros_like(belief.first))

    def features(params, belief):
        return jnp.concatenate([belief.h, belief.z], axis=-1)

    reward, decode = substituted_heads(model, None if isinstance(obs_dims, Mapping) else "obs")

    return WorldModel(
        objective=objective,
        init_belief=init_belief,
        observe=observe,
        imagine=imagine,
        features=features,
        reward=reward,
        feature_size=deter + stoch,
        action_dim=int(action_dim),
        decode=decode,
    )
