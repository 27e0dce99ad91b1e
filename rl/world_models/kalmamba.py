"""KalMamba (:mod:`pssm.kalmamba`) as a :class:`rl.world_model.WorldModel`.

Belief at step ``t``: the Gaussian ``N(mean, diag(cov))`` over ``z_t`` (filtered after
``observe``, predicted after ``imagine``) and the Mamba backbone's recurrence around step ``t``:

    base    the Mamba state before step t's input (conv buffers + selective states of all blocks)
    action  a_{t-1}, the previous action (zero at t = 0)
    mamba   the state after step t's input [wbar_t, a_{t-1}, mask_t],   m  its output m_t

    observe(o_t)   Kalman update of N(mean, cov) with w_t^(k), r_t^(k) = enc_k(o_t^(k))
                   (information form, masked sensors skipped), then (m_t, mamba) recomputed
                   from ``base`` with the real input: exactly the model's step t
    imagine(a_t)   A_t, b_t, Q_t = dyn([m_t, a_t]);  mean' = A_t mean + b_t,
                   cov' = A_t^2 cov + Q_t                     (the Kalman prediction, no sampling)
                   base' = mamba, action' = a_t, and (m_{t+1}, mamba') from base' with the
                   input [mean', a_t, 1]: with no observation the Mamba is fed the *predicted
                   mean* as the latent observation, flagged observed (the paper feeds w_t,
                   which imagination does not have; the mean is the best available stand-in
                   and what m is regularised towards). A following ``observe`` replaces
                   this tentative step by the real one.
    features       the belief mean (the paper's SAC input)

so alternating ``observe`` / ``imagine`` over a sequence reproduces the model's parallel forward
pass; ``filter_sequence`` computes the same beliefs at once with the time-parallel Mamba and
Kalman filter (``lax.associative_scan``). A fully masked step keeps the Gaussian but still
advances the Mamba (with ``wbar = 0`` and zero mask flags, as the model does).

Objective: ``-ELBO + alpha R`` (:class:`pssm.kalmamba.KalMambaELBO`) with the Kalman smoothing
guide (``parallel=True``), rewards scored against ``reward(z_{t+1})``. MC dropout is on in
training (one dropout key per loss evaluation, shared by model and guide) and off for acting
unless ``act_dropout`` (then ``observe`` / ``imagine`` / ``filter_sequence`` draw masks from
their keys: Monte-Carlo samples of the dynamics).
"""

from collections.abc import Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers

from inference import kalman
from inference.guides import kalman_smoothing
from inference.training import elbo_objective
from pssm.kalmamba import KalMambaELBO, backbone_inputs, kalmamba
from pssm.locally_linear import fuse
from pssm.mamba import MambaState
from pssm.observations import step_observations

from ..world_model import WorldModel, substituted_heads


class KalMambaBelief(NamedTuple):
    """``mean``, ``cov`` ``(B, d)``; ``m`` ``(B, d)``; ``mamba``, ``base``: one
    :class:`pssm.mamba.MambaState` per block with leading ``(B,)``; ``action`` ``(B, u)``."""

    mean: jax.Array
    cov: jax.Array
    m: jax.Array
    mamba: tuple[MambaState, ...]
    base: tuple[MambaState, ...]
    action: jax.Array


def kalmamba_world_model(
    obs_dims,
    action_dim: int,
    *,
    alpha: float = 1.0,
    elbo=None,
    mc_dropout: bool = True,
    act_dropout: bool = False,
    detach_filter: bool = True,
    **model_kwargs,
) -> WorldModel:
    """Build KalMamba with a reward head as a world model.

    Args:
        obs_dims: observation shape or ``{modality: shape}`` (vectors or ``(H, W, C)`` images).
        action_dim: ``u`` (at least 1).
        alpha: weight of the Mahalanobis regulariser (paper: 1).
        elbo: inner NumPyro ELBO (default ``TraceMeanField_ELBO()``: the analytic per-step KL of
            the VRKN bound), or a metrics wrapper such as free nats.
        mc_dropout: MC dropout in training.
        act_dropout: MC dropout in ``observe`` / ``imagine`` / ``filter_sequence``.
        detach_filter: stop the regulariser's gradient into the filtered belief.
        **model_kwargs: sizes and options of :func:`pssm.kalmamba.kalmamba` (``latent_dim``,
            ``hidden``, ``d_model``, ``num_blocks``, ``d_state``, ``dropout``, ``seed``, ...).
    """
    if int(action_dim) < 1:
        raise ValueError(f"a world model needs actions, got action_dim={action_dim}")
    model = kalmamba(obs_dims, action_dim=action_dim, reward=True, **model_kwargs)
    inner = KalMambaELBO(elbo, alpha=alpha, mc_dropout=mc_dropout, detach_filter=detach_filter)
    objective = elbo_objective(model, kalman_smoothing(model, parallel=model.parallel), inner)
    names, d, u = list(model.obs_dims), model.latent_dim, model.action_dim
    K, several = len(names), isinstance(obs_dims, Mapping)
    drop = (lambda key: key) if act_dropout else (lambda key: None)
    visible = jnp.arange(d) < model.observed_dim  # latent coordinates an encoder emits

    def step_mamba(backbone, base, wbar, a_prev, mask, key):
        """One backbone step from ``base``: ``(m_t (B, d), state)``."""
        x = backbone_inputs(wbar, a_prev, mask)[:, None]
        m, state = backbone(x, base, key=drop(key), parallel=False)
        return m[:, 0], state

    def init_belief(params, batch_size):
        dtype = jnp.result_type(float)
        with handlers.substitute(data=params):
            n = model.networks()
        mean = jnp.zeros((batch_size, d), dtype)
        cov = jnp.broadcast_to(n.P0, (batch_size, d)).astype(dtype)
        base = model.backbone_module.init_state((batch_size,), dtype)
        action = jnp.zeros((batch_size, u), dtype)
        seen = jnp.ones((batch_size, K), bool)
        m, state = step_mamba(n.backbone, base, mean, action, seen, None)
        return KalMambaBelief(mean, cov, m, state, base, action)

    def observe(params, key, belief, obs, mask=None):
        obs, seen = step_observations(model.preprocess(obs), mask, names)
        with handlers.substitute(data=params):
            n = model.networks()
        w, R = [], []
        for name in names:
            w_k, R_k = n.encoders[name](obs[name].astype(belief.mean.dtype))
            w.append(w_k)
            R.append(R_k)
        w, R = jnp.stack(w, axis=1), jnp.stack(R, axis=1)  # (B, K, d)
        (mean, cov), _ = kalman.update(kalman.Gaussian(belief.mean, belief.cov), w, R, seen)
        m, state = step_mamba(n.backbone, belief.base, fuse(w, R, seen), belief.action, seen, key)
        return belief._replace(mean=mean, cov=cov, m=m, mamba=state)

    def imagine(params, key, belief, action):
        action = jnp.asarray(action, belief.mean.dtype)
        k_dyn, k_pre = jax.random.split(key)
        with handlers.substitute(data=params):
            n = model.networks()
        A, b, Q = n.dynamics(jnp.concatenate([belief.m, action], -1), drop(k_dyn))
        mean, cov = A * belief.mean + b, A * A * belief.cov + Q
        seen = jnp.ones((mean.shape[0], K), bool)
        pseudo = jnp.where(visible, mean, 0.0)  # the backbone's input, as an observation's
        m, state = step_mamba(n.backbone, belief.mamba, pseudo, action, seen, k_pre)
        return KalMambaBelief(mean, cov, m, state, belief.mamba, action)

    def filter_sequence(params, key, obs, actions, mask=None):
        with handlers.substitute(data=params):
            x = model.prepare(obs, actions, mask)
            f = model.forward(x, drop(key), return_states=True)
        filt = jax.vmap(partial(kalman.filter, parallel=model.parallel))(*f.structure).filtered
        base = jax.tree.map(
            lambda s: jnp.concatenate([jnp.zeros_like(s[:, :1]), s[:, :-1]], axis=1),
            f.mamba_state,
        )
        a_prev = jnp.concatenate([jnp.zeros_like(x.actions[:, :1]), x.actions[:, :-1]], 1)
        return KalMambaBelief(filt.mean, filt.cov, f.m, f.mamba_state, base, a_prev)

    def features(params, belief):
        return belief.mean

    reward, decode = substituted_heads(model, None if several else names[0])

    return WorldModel(
        objective=objective,
        init_belief=init_belief,
        observe=observe,
        imagine=imagine,
        features=features,
        reward=reward,
        feature_size=d,
        action_dim=u,
        decode=decode,
        filter_sequence=filter_sequence,
    )
