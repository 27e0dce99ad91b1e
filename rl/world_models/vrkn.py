"""The VRKN (Becker & Neumann 2022) as a :class:`rl.world_model.WorldModel`.

Belief: the filtered Gaussian ``N(mean, diag(var))`` of :mod:`pssm.vrkn` plus one sample
``sample ~ N(mean, diag(var))`` of the state (the official code keeps the same triple):

    init_belief   (m_0, P_0), sample = m_0
    observe       Kalman update of (mean, var) with the encoders' (w, r) of the observed
                  modalities; sample redrawn from the updated belief (reparameterised)
    imagine       (A, b, Q) = transition(mean, a; MC-dropout key)         (linearised at mean)
                  mean' = A mean + b,  var' = A^2 var + Q,  sample' = A sample + b + sqrt(Q) eps
    features      mean (default) or sample (``features="sample"``, the official code's choice)

``imagine`` is one step of the model's own generative process: the dynamics are linearised at
the belief mean, which in open loop evolves as the predictive mean, and ``sample'`` is an
ancestral sample of ``z_{t+1} | z_t = sample`` (so ``sample'`` is again a draw from
``N(mean', var')``). Everything is reparameterised (``eps`` and the dropout masks come from
``key``), so Dreamer can backpropagate returns through ``imagine`` into the belief and the
parameters. With MC dropout every ``imagine`` draws fresh masks from its key: the spread of
imagined trajectories over keys is the model's epistemic uncertainty (Sec. 3.3).

Training: ``-ELBO`` of the model with the Kalman-smoothing guide and free nats
(:class:`pssm.vrkn.FreeNatsELBO`, 3 per (batch, time) element by default).
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers

from inference import kalman
from inference.guides import kalman_smoothing
from inference.objectives import FreeNatsELBO
from inference.training import elbo_objective
from pssm.vrkn import vrkn

from ..world_model import WorldModel, step_observations


class VRKNBelief(NamedTuple):
    """``mean``, ``var``, ``sample``: ``(B, d)`` each."""

    mean: jax.Array
    var: jax.Array
    sample: jax.Array


def vrkn_world_model(
    obs_dims,
    action_dim: int,
    *,
    latent_dim: int = 230,
    hidden: int = 300,
    mlp_hidden=(300, 300),
    mc_dropout: bool = True,
    dropout_rate: float = 0.1,
    free_nats: float = 3.0,
    features: str = "mean",
    elbo=None,
    seed: int = 0,
    **model_kwargs,
) -> WorldModel:
    """Build a VRKN with a reward head and its Kalman-smoothing guide, as a world model.

    Args:
        obs_dims: one modality's shape or ``{modality: shape}`` (ints for vectors,
            ``(H, W, C)`` for images; see :func:`pssm.vrkn.vrkn`).
        action_dim: ``u``.
        latent_dim, hidden, mlp_hidden: sizes (VRKN: 230, 300).
        mc_dropout, dropout_rate: Monte-Carlo dropout in the transition (VRKN: on, 0.1).
        free_nats: per (batch, time) element (VRKN: 3); ignored when ``elbo`` is given.
        features: ``"mean"`` (the belief mean) or ``"sample"`` (its sample, as the official
            code feeds actor, critic and reward head).
        elbo: the ELBO to train with (default ``FreeNatsELBO(free_nats)``).
        seed: network initialisation.
        **model_kwargs: further arguments of :func:`pssm.vrkn.vrkn`.
    """
    if features not in ("mean", "sample"):
        raise ValueError(f"features must be 'mean' or 'sample', got {features!r}")
    model = vrkn(
        obs_dims, action_dim, latent_dim, hidden, mlp_hidden=mlp_hidden, mc_dropout=mc_dropout,
        dropout_rate=dropout_rate, reward=True, seed=seed, **model_kwargs,
    )  # fmt: skip
    guide = kalman_smoothing(model)
    objective = elbo_objective(model, guide, elbo or FreeNatsELBO(free_nats))
    names = list(model.obs_dims)
    u = int(action_dim)

    def networks(params):
        with handlers.substitute(data=params):
            return model.networks()

    def init_belief(params, batch_size):
        m0, P0 = networks(params).initial
        mean = jnp.broadcast_to(m0, (batch_size, m0.shape[-1]))
        return VRKNBelief(mean, jnp.broadcast_to(P0, mean.shape), mean)

    def observe(params, key, belief, obs, mask=None):
        n = networks(params)
        obs, m = step_observations(model.preprocess(obs), mask, names)
        w, R = [], []
        for name in names:
            w_k, R_k = n.encoders[name](obs[name].astype(belief.mean.dtype))
            w.append(w_k)
            R.append(R_k)
        posterior, _ = kalman.update(
            kalman.Gaussian(belief.mean, belief.var), jnp.stack(w, -2), jnp.stack(R, -2), m
        )
        mean, var = posterior
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        return VRKNBelief(mean, var, mean + jnp.sqrt(var) * eps)

    def imagine(params, key, belief, action):
        n = networks(params)
        k_drop, k_eps = jax.random.split(key)
        a = jnp.asarray(action, belief.mean.dtype).reshape(belief.mean.shape[0], u)
        A, b, Q = n.transition(belief.mean, a, k_drop if model.mc_dropout else None)
        mean, var = kalman.predict(kalman.Gaussian(belief.mean, belief.var), (A, b, Q))
        eps = jax.random.normal(k_eps, mean.shape, mean.dtype)
        return VRKNBelief(mean, var, A * belief.sample + b + jnp.sqrt(Q) * eps)

    def feature_fn(params, belief):
        return belief.mean if features == "mean" else belief.sample

    def reward(params, f):
        return networks(params).reward(f)

    def decode(params, f):
        out = {k: fn(f) for k, fn in networks(params).decoders.items()}
        return out if isinstance(obs_dims, Mapping) else out[names[0]]

    return WorldModel(
        objective=objective,
        init_belief=init_belief,
        observe=observe,
        imagine=imagine,
        features=feature_fn,
        reward=reward,
        feature_size=model.feature_size,
        action_dim=u,
        decode=decode,
    )
