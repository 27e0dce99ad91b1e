"""The recurrent state space model (RSSM) of PlaNet and Dreamer, for low-dimensional observations.

A deterministic state ``h_t`` (size ``deter``) carries the past through a GRU; a stochastic
state ``z_t`` (size ``stoch``) is drawn from a diagonal Gaussian given ``h_t`` (Hafner et al.
2019, "Learning Latent Dynamics for Planning from Pixels", Eq. 4 and Fig. 2c):

    h_0 = 0,                     h_t = GRU(h_{t-1}, MLP([z_{t-1}, a_{t-1}]))     t >= 1
    z_t ~ N(mu(h_t), diag(sigma^2(h_t)))                                         (prior)
    o_t^(k) ~ N(dec_k([h_t, z_t]), diag(sigma_k^2))                              unless masked

(``sigma^2 = softplus + min_var``, Dreamer's minimum standard deviation 0.1 by default). The
posterior of the RSSM, ``q(z_t | h_t, o_t)`` with ``h_t`` recomputed from the posterior's own
samples, is the amortised filtering guide :func:`inference.guides.filtering`; it reaches the
deterministic path through ``model.deterministic`` and nothing else. Trained with
``TraceMeanField_ELBO``, each step contributes ``KL(q(z_t | h_t, o_t) || p(z_t | h_t))`` in
closed form: the RSSM objective.

Sites (conventions in :mod:`pssm.core`): ``"z_0"`` ``(B, stoch)`` and ``"z"``
``(T-1, B, stoch)`` (a NumPyro ``scan``, the plate ``"batch"`` inside its body), the
deterministic site ``"h"`` ``(B, T, deter)``, and ``"obs"`` (one array) or ``"obs_<name>"`` per
modality of a dict. The model returns the features ``[h_t, z_t]`` ``(B, T, deter + stoch)``.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.control_flow import scan

from . import nets
from .core import gaussian
from .locally_linear import gaussian_observations, modalities, observation_sites, prepare_inputs


class DeterministicPath(nnx.Module):
    """``h_t = GRU(h_{t-1}, act(W [z_{t-1}, a_{t-1}] + c))``, the RSSM's deterministic path."""

    def __init__(self, stoch: int, action_dim: int, deter: int, hidden: Sequence[int], *, rngs):
        self.inputs = nets.MLP(stoch + action_dim, hidden, rngs=rngs)
        self.gru = nets.GRU(self.inputs.out_features, deter, rngs=rngs)

    def __call__(self, h_prev: jax.Array, z_prev: jax.Array, a_prev: jax.Array) -> jax.Array:
        return self.gru(h_prev, self.inputs(jnp.concatenate([z_prev, a_prev], axis=-1)))


def score_rewards(rewards: jax.Array, features: jax.Array, head) -> None:
    """Score ``rewards[:, t] ~ N(head(features[:, t + 1]), 1)`` for ``t < T - 1`` at the site
    ``"reward"`` inside the plate ``"batch"`` (``head`` maps ``(..., F) -> (..., 1)``)."""
    rewards = jnp.asarray(rewards)
    B, T = features.shape[:2]
    if rewards.shape != (B, T):
        raise ValueError(f"rewards has shape {rewards.shape}, expected ({B}, {T})")
    mean = head(features[:, 1:])[..., 0]
    with numpyro.plate("batch", B):
        numpyro.sample("reward", dist.Normal(mean, 1.0).to_event(1), obs=rewards[:, :-1])


def rssm(
    obs_dim: int | Mapping[str, int],
    action_dim: int = 0,
    stoch: int = 30,
    deter: int = 200,
    hidden: int | Sequence[int] = 200,
    *,
    min_var: float = 0.01,
    obs_var: float = 1.0,
    learn_obs_var: bool = False,
    min_obs_var: float = 0.01,
    reward: bool = False,
    name: str = "rssm",
    seed: int = 0,
):
    """Build an RSSM (equations in the module docstring).

    Args:
        obs_dim: observation size ``p``, or ``{modality: p_k}`` for several modalities.
        action_dim: ``u`` (``0``: no actions).
        stoch, deter: sizes of ``z_t`` and ``h_t`` (PlaNet/Dreamer: 30 and 200).
        hidden: width of the one hidden layer of each network, or a sequence of widths.
        min_var: floor of the prior variance.
        obs_var, learn_obs_var, min_obs_var: decoder variance ``sigma_k^2``, fixed (Dreamer's
            unit-variance Gaussian) or learned per modality and feature above ``min_obs_var``.
        name: prefix of the parameter sites ``"<name>_deterministic$params"``,
            ``"<name>_prior$params"``, ``"<name>_decoder_<modality>$params"``.
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None, rewards=None)`` carrying

        * ``model.deterministic()``: registers the deterministic path's parameter sites (the
          model's own: a guide calling it shares them) and returns the pure function
          ``(h_prev, z_prev, a_prev) -> h``. Call it outside any ``scan`` and use the function
          inside; ``a_prev`` is ``(..., 0)`` for a model without actions.
        * ``model.latent_dim`` (``stoch``), ``model.deterministic_size`` (``deter``),
          ``model.feature_size`` (``deter + stoch``), ``model.action_dim``, ``model.obs_dims``.
    """
    dims, u = modalities(obs_dim), int(action_dim)
    widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    rngs = nnx.Rngs(seed)
    path = DeterministicPath(stoch, u, deter, widths, rngs=rngs)
    prior = nets.GaussianMLP(deter, widths, stoch, min_var=min_var, rngs=rngs)
    decoders = {k: nets.MLP(deter + stoch, widths, p, rngs=rngs) for k, p in dims.items()}
    reward_head = nets.MLP(deter + stoch, widths, 1, rngs=rngs) if reward else None
    sites = observation_sites(obs_dim)

    def deterministic():
        return nets.register(f"{name}_deterministic", path)

    def model(obs, actions=None, mask=None, rewards=None):
        x = prepare_inputs(obs_dim, u, obs, actions, mask)
        B, T = x.mask.shape[:2]
        step = deterministic()
        prior_net = nets.register(f"{name}_prior", prior)
        h0 = jnp.zeros((B, deter), nets.default_param_dtype())
        with numpyro.plate("batch", B):
            z0 = numpyro.sample("z_0", gaussian(*prior_net(h0)))
        a_prev = jnp.zeros((B, T, 0), h0.dtype) if x.actions is None else x.actions
        a_prev = jnp.moveaxis(a_prev[:, :-1], 1, 0)  # (T-1, B, u): a_{t-1} for t = 1..T-1

        def transition(carry, a):
            h, z = carry
            h = step(h, z, a)
            with numpyro.plate("batch", B):
                z = numpyro.sample("z", gaussian(*prior_net(h)))
            return (h, z), (h, z)

        _, (hs, zs) = scan(transition, (h0, z0), a_prev)
        h = jnp.concatenate([h0[:, None], jnp.moveaxis(hs, 0, 1)], axis=1)
        z = jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)
        numpyro.deterministic("h", h)
        features = jnp.concatenate([h, z], axis=-1)
        means = {k: nets.register(f"{name}_decoder_{k}", decoders[k])(features) for k in dims}
        gaussian_observations(
            x, means, sites, prefix=name, obs_var=obs_var, learn_obs_var=learn_obs_var,
            min_obs_var=min_obs_var,
        )  # fmt: skip
        if rewards is not None:
            score_rewards(rewards, features, nets.register(f"{name}_reward", reward_head))
        return features

    def reward_fn():
        """Register the reward head; returns ``features (..., F) -> (...)``."""
        if reward_head is None:
            raise ValueError("this RSSM was built without a reward head (reward=True)")
        head = nets.register(f"{name}_reward", reward_head)
        return lambda f: head(f)[..., 0]

    def decoder_fns():
        """Register the decoders; returns ``{modality: features (..., F) -> mean}``."""
        return {k: nets.register(f"{name}_decoder_{k}", decoders[k]) for k in dims}

    def prior_fn():
        """Register the prior network; returns ``h -> (mu, sigma^2)`` of ``p(z_t | h_t)``."""
        return nets.register(f"{name}_prior", prior)

    model.reward, model.decoders, model.prior = reward_fn, decoder_fns, prior_fn
    model.deterministic = deterministic
    model.latent_dim, model.deterministic_size, model.feature_size = stoch, deter, deter + stoch
    model.action_dim, model.obs_dims = u, dims
    return model
