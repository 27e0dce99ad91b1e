"""The RSSM (PlaNet / Dreamer) as a :class:`rl.world_model.WorldModel`.

Belief: a sample of the RSSM state, ``(h_t, z_t)`` (Hafner et al. 2019, "Learning Latent
Dynamics for Planning from Pixels", Fig. 2c), plus a flag marking the first step of an episode:

    observe    z_t ~ q(z_t | h_t, o_t)        the amortised filtering posterior
                                             (:func:`inference.guides.filtering`), h kept
    imagine    h_{t+1} = GRU(h_t, MLP([z_t, a_t])),  z_{t+1} ~ p(z_{t+1} | h_{t+1})
    features   [h_t, z_t]

The model trains on ``-ELBO`` with the per-step analytic KL of ``TraceMeanField_ELBO`` (the
RSSM objective) unless another ELBO is given.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO

from inference.guides import filtering
from inference.training import elbo_objective
from pssm.rssm import rssm

from ..world_model import WorldModel


class RSSMBelief(NamedTuple):
    """``h`` ``(B, deter)``, ``z`` ``(B, stoch)``, ``first`` ``(B,)``: no observation seen yet."""

    h: jax.Array
    z: jax.Array
    first: jax.Array


def _flat_obs(obs, names, mask):
    """Modalities flattened and concatenated in model order, zero where masked (as the guide
    sees them)."""
    parts = [obs[k] for k in names] if isinstance(obs, Mapping) else [obs]
    B = mask.shape[0]
    flat = [jnp.reshape(o, (B, -1)) * mask[:, k, None] for k, o in enumerate(parts)]
    return jnp.concatenate(flat, axis=-1)


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
    seed=0,
):
    """The NumPyro RSSM with a reward head and its amortised filtering guide (the pair that
    :func:`rssm_world_model` trains; the same arguments give the same parameter sites)."""
    model = rssm(
        obs_dims, action_dim, stoch, deter, hidden, min_var=min_var, obs_var=obs_var,
        reward=True, seed=seed,
    )  # fmt: skip
    guide = filtering(
        model, hidden=posterior_hidden or hidden, latent_dim=stoch, min_var=min_var, seed=seed + 1
    )
    return model, guide


def rssm_world_model(
    obs_dims: int | Mapping[str, int],
    action_dim: int,
    *,
    stoch: int = 30,
    deter: int = 200,
    hidden: int = 200,
    posterior_hidden: int | None = None,
    min_var: float = 0.01,
    obs_var: float = 1.0,
    elbo=None,
    seed: int = 0,
) -> WorldModel:
    """Build an RSSM with a reward head and its filtering guide, as a world model.

    Args:
        obs_dims: observation size, or ``{modality: size}`` (flat vectors).
        action_dim: ``u``.
        stoch, deter, hidden: RSSM sizes (PlaNet/Dreamer: 30, 200, 200).
        posterior_hidden: hidden width of the posterior network (default ``hidden``).
        min_var: floor of prior and posterior variances.
        obs_var: fixed decoder variance.
        elbo: NumPyro ELBO (default ``TraceMeanField_ELBO()``: analytic per-step KL).
        seed: network initialisation.
    """
    model, guide = rssm_model_and_guide(
        obs_dims, action_dim, stoch=stoch, deter=deter, hidden=hidden,
        posterior_hidden=posterior_hidden, min_var=min_var, obs_var=obs_var, seed=seed,
    )  # fmt: skip
    objective = elbo_objective(model, guide, elbo or TraceMeanField_ELBO())
    names = list(model.obs_dims)
    K, obs_size = len(names), sum(model.obs_dims.values())

    def init_belief(params, batch_size):
        dtype = jnp.result_type(float)
        return RSSMBelief(
            jnp.zeros((batch_size, deter), dtype),
            jnp.zeros((batch_size, stoch), dtype),
            jnp.ones((batch_size,), bool),
        )

    def observe(params, key, belief, obs, mask=None):
        B = belief.h.shape[0]
        m = jnp.ones((B, K), bool) if mask is None else jnp.asarray(mask, bool)
        m = jnp.broadcast_to(m[:, None], (B, K)) if m.ndim == 1 else m
        o = _flat_obs(obs, names, m).astype(belief.h.dtype)
        seen = [belief.h, o, m.astype(o.dtype), belief.first[:, None].astype(o.dtype)]
        x = jnp.concatenate(seen, axis=-1)
        with handlers.substitute(data=params):
            mu, var = guide.posterior(deter + obs_size + K + 1)(x)
        z = mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape, mu.dtype)
        return RSSMBelief(belief.h, z, jnp.zeros_like(belief.first))

    def imagine(params, key, belief, action):
        with handlers.substitute(data=params):
            h = model.deterministic()(belief.h, belief.z, action.astype(belief.h.dtype))
            mu, var = model.prior()(h)
        z = mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape, mu.dtype)
        return RSSMBelief(h, z, jnp.zeros_like(belief.first))

    def features(params, belief):
        return jnp.concatenate([belief.h, belief.z], axis=-1)

    def reward(params, f):
        with handlers.substitute(data=params):
            return model.reward()(f)

    def decode(params, f):
        with handlers.substitute(data=params):
            out = {k: fn(f) for k, fn in model.decoders().items()}
        return out if isinstance(obs_dims, Mapping) else out["obs"]

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
