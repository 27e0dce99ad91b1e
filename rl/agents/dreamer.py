"""Dreamer: an actor-critic learned on trajectories imagined by a world model.

Hafner et al. (2020), "Dream to Control: Learning Behaviors by Latent Imagination", ICLR,
Sec. 3 and Algorithm 1; the slow (target) critic and the entropy bonus follow DreamerV2
(Hafner et al. 2021, "Mastering Atari with Discrete World Models", Sec. 2.2).

From start beliefs ``b_0`` (filtered beliefs of replayed sequences, without gradient) the actor
``a_t ~ pi_phi(a | f_t)`` imagines ``H`` steps through the world model's ``imagine``
(:func:`rl.world_model.imagine_rollout`): features ``f_{0:H}``, rewards ``r_{0:H-1}`` of arriving
in ``f_{1:H}``. With the target critic's values ``v_t = V_target(f_t)`` the lambda-returns
``R_t`` (:func:`rl.agents.returns.lambda_returns`, Eq. 6) and weights ``w_t = gamma^t`` give

    actor loss   L(phi) = -mean_{t<H, n} w_t (R_t + eta H[pi_phi(. | f_t)])
    critic loss  L(psi) =  mean_{t<H, n} w_t 0.5 (V_psi(sg(f_t)) - sg(R_t))^2

The actor's gradient is the *dynamics backpropagation* of Dreamer: it flows from the returns
through the rewards, values and every ``imagine`` step back into the sampled actions
(reparameterised ``a = tanh(mu + sigma eps)``). The actor's input features are stopped
(``pi(sg(f_t))``, as in the official code; ``actor_feature_grad`` lifts it), and the model's
parameters are held fixed (``stop_gradient``): the model is trained by its own objective
elsewhere. Actor and critic have separate Adam optimisers with global-norm clipping; the target
critic follows the critic every ``target_every`` updates by ``psi' <- tau psi + (1 - tau) psi'``
(``tau = 1``: a copy).

The policy is Dreamer's tanh-Gaussian: ``mu = s tanh(m / s)`` (``s = mean_scale``),
``sigma = softplus(x + c) + min_std`` with ``c`` such that ``sigma = init_std`` at ``x = 0``; its
entropy ``H = sum_i [log(sigma_i sqrt(2 pi e)) + E log(1 - tanh^2 u_i)]`` is estimated with one
reparameterised sample ``u``. Acting (an :class:`rl.agents.Agent`: the online filter is
:func:`rl.world_model.act`'s) takes ``tanh(mu)`` of the filtered belief's features (evaluation)
or a sample plus Gaussian exploration noise (data collection).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl.agents import _nets, no_memory
from rl.agents.returns import discount_weights, lambda_returns
from rl.world_model import WorldModel, imagine_rollout

PyTree = Any
_LOG_2PI_E = float(np.log(2 * np.pi * np.e))


class DreamerConfig(NamedTuple):
    """Dreamer settings (defaults from Hafner et al. 2020 and its official code).

    Attributes:
        horizon: imagination horizon ``H``.
        lam: ``lambda`` of the lambda-returns.
        gamma: discount.
        actor_lr, critic_lr: Adam learning rates.
        grad_clip: global gradient-norm clip of each optimiser.
        adam_eps: Adam's epsilon.
        actor_hidden, critic_hidden: MLP hidden sizes (ELU).
        target_every: update the target critic every this many updates.
        target_tau: its mixing fraction (``1``: copy the critic).
        entropy_scale: ``eta``, the weight of the actor's entropy bonus (``0`` in Dreamer).
        explore_noise: standard deviation of the Gaussian noise added to sampled actions when
            acting with ``explore``.
        init_std, min_std, mean_scale: tanh-Gaussian policy parameterisation.
        actor_feature_grad: let the actor's gradient also flow through its own input features
            (the full pathwise derivative of the imagined return); ``False`` stops it, as
            Dreamer's official code does, so gradients reach the actor only through its actions.
    """

    horizon: int = 15
    lam: float = 0.95
    gamma: float = 0.99
    actor_lr: float = 8e-5
    critic_lr: float = 8e-5
    grad_clip: float = 100.0
    adam_eps: float = 1e-5
    actor_hidden: Sequence[int] = (400, 400, 400, 400)
    critic_hidden: Sequence[int] = (400, 400, 400)
    target_every: int = 100
    target_tau: float = 1.0
    entropy_scale: float = 0.0
    explore_noise: float = 0.3
    init_std: float = 5.0
    min_std: float = 1e-4
    mean_scale: float = 5.0
    actor_feature_grad: bool = False


#: Smaller networks for state-based tasks on CPU.
DREAMER_CPU = DreamerConfig(actor_hidden=(128, 128), critic_hidden=(128, 128))


class AgentState(NamedTuple):
    """Learned state: actor, critic and target critic parameters (pure dicts of
    :class:`pssm.nets.MLP`, :func:`rl.agents._nets.mlp`), optimiser
    states and the update count."""

    actor: PyTree
    critic: PyTree
    target_critic: PyTree
    actor_opt: PyTree
    critic_opt: PyTree
    step: jax.Array


class Dreamer(NamedTuple):
    """Dreamer's pure functions (see :func:`dreamer`); the first five are
    :class:`rl.agents.Agent`."""

    init: Callable[[jax.Array], AgentState]
    memory: Callable[..., tuple]
    act: Callable[..., tuple[jax.Array, tuple]]
    update: Callable[..., tuple[AgentState, dict]]
    sequences: Callable[[int], int]
    train_step: Callable[..., tuple[AgentState, dict]]
    policy: Callable[..., jax.Array]
    actor_dist: Callable[..., tuple[jax.Array, jax.Array]]
    value: Callable[..., jax.Array]
    entropy: Callable[..., jax.Array]
    actor_loss: Callable[..., tuple[jax.Array, tuple[dict, tuple]]]
    critic_loss: Callable[..., tuple[jax.Array, dict]]


def _log1m_tanh_sq(u):
    """``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2 u))``, stable for large ``|u|``."""
    return 2.0 * (np.log(2.0) - u - jax.nn.softplus(-2.0 * u))


def flatten_beliefs(beliefs):
    """``(B, T, ...)`` beliefs (e.g. :func:`rl.world_model.filter_sequence`) -> ``(B*T, ...)``
    start beliefs, without gradient."""
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x.reshape(-1, *x.shape[2:])), beliefs)


def _validate(config: DreamerConfig):
    if config.horizon < 1 or config.target_every < 1:
        raise ValueError(f"horizon and target_every must be >= 1, got {config}")
    if not (0 <= config.lam <= 1 and 0 < config.gamma <= 1 and 0 < config.target_tau <= 1):
        raise ValueError(f"need lam in [0, 1], gamma and target_tau in (0, 1], got {config}")
    if min(config.actor_lr, config.critic_lr, config.grad_clip) <= 0:
        raise ValueError(f"learning rates and grad_clip must be positive, got {config}")
    if config.init_std <= config.min_std or config.min_std < 0 or config.mean_scale <= 0:
        raise ValueError(f"need init_std > min_std >= 0 and mean_scale > 0, got {config}")
    if config.explore_noise < 0 or config.entropy_scale < 0:
        raise ValueError(f"explore_noise and entropy_scale must be >= 0, got {config}")


def dreamer(wm: WorldModel, config: DreamerConfig | None = None, start_batch: int = 8) -> Dreamer:
    """Dreamer agent over the world model ``wm`` (model parameters are always passed in).

    Returns:
        A :class:`Dreamer` of pure functions (``init`` eager, the rest jitted):

        - ``init(key) -> AgentState``; ``memory``: none (``()``);
        - ``act(model_params, state, (), belief, key, explore) -> (action (B, u), ())``;
        - ``update(model_params, state, key, beliefs, batch, updates) -> (state, metrics)``:
          ``updates`` train steps, each from the filtered beliefs of ``start_batch`` of the
          replayed windows ``beliefs`` ``(updates * start_batch, T, ...)`` (every step of them
          a start); metrics averaged;
        - ``sequences(updates) = updates * start_batch``;
        - ``train_step(model_params, state, key, start_beliefs) -> (state, metrics)``: one actor
          and one critic step on trajectories imagined from ``start_beliefs`` ``(N, ...)``;
        - ``policy(actor_params, features, key, explore) -> actions``;
        - ``actor_dist(actor_params, features) -> (mu, sigma)`` of the pre-tanh Gaussian;
        - ``value(critic_params, features) -> values``;
        - ``entropy(actor_params, features, key) -> (...)``: one-sample estimate of the policy's
          entropy at each feature vector;
        - ``actor_loss(actor_params, target_critic_params, model_params, key, start_beliefs)
          -> (loss, (metrics, (features, returns, weights)))`` and
          ``critic_loss(critic_params, features, returns, weights) -> (loss, metrics)``.
    """
    config = DreamerConfig() if config is None else config
    _validate(config)
    u, F, H = wm.action_dim, wm.feature_size, config.horizon
    raw_init_std = float(np.log(np.expm1(config.init_std - config.min_std)))

    actor_init, actor_apply = _nets.mlp(F, config.actor_hidden, 2 * u)
    critic_init, critic_apply = _nets.mlp(F, config.critic_hidden, 1)

    def optimiser(lr):
        return optax.chain(
            optax.clip_by_global_norm(config.grad_clip), optax.adam(lr, eps=config.adam_eps)
        )

    actor_opt, critic_opt = optimiser(config.actor_lr), optimiser(config.critic_lr)

    def actor_dist(actor_params, features):
        out = actor_apply(actor_params, features)
        m, x = out[..., :u], out[..., u:]
        mu = config.mean_scale * jnp.tanh(m / config.mean_scale)
        sigma = jax.nn.softplus(x + raw_init_std) + config.min_std
        return mu, sigma

    def value(critic_params, features):
        return critic_apply(critic_params, features)[..., 0]

    def policy(actor_params, features, key, explore=True):
        mu, sigma = actor_dist(actor_params, features)
        k_pi, k_noise = jax.random.split(key)
        sample = jnp.tanh(mu + sigma * jax.random.normal(k_pi, mu.shape, mu.dtype))
        noisy = sample + config.explore_noise * jax.random.normal(k_noise, mu.shape, mu.dtype)
        return jnp.where(explore, jnp.clip(noisy, -1.0, 1.0), jnp.tanh(mu))

    def entropy(actor_params, features, key):
        mu, sigma = actor_dist(actor_params, features)
        pre = mu + sigma * jax.random.normal(key, mu.shape, mu.dtype)
        return jnp.sum(0.5 * _LOG_2PI_E + jnp.log(sigma) + _log1m_tanh_sq(pre), axis=-1)

    def actor_loss(actor_params, target_params, model_params, key, start_beliefs):
        model_params = jax.lax.stop_gradient(model_params)
        start_beliefs = jax.lax.stop_gradient(start_beliefs)
        target_params = jax.lax.stop_gradient(target_params)
        k_roll, k_ent = jax.random.split(key)

        def pi(f, k):
            f = f if config.actor_feature_grad else jax.lax.stop_gradient(f)
            mu, sigma = actor_dist(actor_params, f)
            return jnp.tanh(mu + sigma * jax.random.normal(k, mu.shape, mu.dtype))

        feats, actions, rewards = imagine_rollout(wm, model_params, k_roll, start_beliefs, pi, H)
        values = value(target_params, feats)
        R = lambda_returns(rewards, values, config.gamma, config.lam)
        w = discount_weights(config.gamma, H, R.shape[1:])
        ent = entropy(actor_params, jax.lax.stop_gradient(feats[:-1]), k_ent)
        loss = -jnp.mean(w * (R + config.entropy_scale * ent))
        metrics = {
            "actor_loss": loss,
            "imagined_return": jnp.mean(R[0]),
            "imagined_reward": jnp.mean(rewards),
            "entropy": jnp.mean(ent),
            "action_abs": jnp.mean(jnp.abs(actions)),
        }
        return loss, (metrics, (feats, R, w))

    def critic_loss(critic_params, features, returns, weights):
        v = value(critic_params, jax.lax.stop_gradient(features[:-1]))
        err = v - jax.lax.stop_gradient(returns)
        loss = jnp.mean(weights * 0.5 * err**2)
        return loss, {"critic_loss": loss, "value": jnp.mean(v)}

    def init(key) -> AgentState:
        k_actor, k_critic = jax.random.split(key)
        actor, critic = actor_init(k_actor), critic_init(k_critic)
        return AgentState(
            actor=actor,
            critic=critic,
            target_critic=jax.tree.map(jnp.copy, critic),
            actor_opt=actor_opt.init(actor),
            critic_opt=critic_opt.init(critic),
            step=jnp.zeros((), jnp.int32),
        )

    def train_step(model_params, state: AgentState, key, start_beliefs):
        grad_actor = jax.value_and_grad(actor_loss, has_aux=True)
        (_, (metrics, (feats, R, w))), g_actor = grad_actor(
            state.actor, state.target_critic, model_params, key, start_beliefs
        )
        (_, c_metrics), g_critic = jax.value_and_grad(critic_loss, has_aux=True)(
            state.critic, feats, R, w
        )
        upd, a_opt = actor_opt.update(g_actor, state.actor_opt, state.actor)
        actor = optax.apply_updates(state.actor, upd)
        upd, c_opt = critic_opt.update(g_critic, state.critic_opt, state.critic)
        critic = optax.apply_updates(state.critic, upd)
        step = state.step + 1
        sync = step % config.target_every == 0
        tau = config.target_tau
        target = jax.tree.map(
            lambda c, t: jnp.where(sync, tau * c + (1 - tau) * t, t), critic, state.target_critic
        )
        metrics = {
            **metrics,
            **c_metrics,
            "actor_grad_norm": optax.tree.norm(g_actor),
            "critic_grad_norm": optax.tree.norm(g_critic),
        }
        return AgentState(actor, critic, target, a_opt, c_opt, step), metrics

    def act(model_params, state: AgentState, memory, belief, key, explore):
        return policy(state.actor, wm.features(model_params, belief), key, explore), memory

    def update(model_params, state: AgentState, key, beliefs, batch, updates: int):
        groups = jax.tree.map(lambda v: v.reshape(updates, -1, *v.shape[1:]), beliefs)

        def one(agent_state, xs):
            k, group = xs
            return train_step(model_params, agent_state, k, flatten_beliefs(group))

        state, metrics = jax.lax.scan(one, state, (jax.random.split(key, updates), groups))
        return state, jax.tree.map(jnp.mean, metrics)

    return Dreamer(
        init=init,
        memory=no_memory,
        act=act,
        update=update,
        sequences=lambda updates: updates * int(start_batch),
        train_step=jax.jit(train_step),
        policy=jax.jit(policy),
        actor_dist=actor_dist,
        value=value,
        entropy=entropy,
        actor_loss=actor_loss,
        critic_loss=critic_loss,
    )
