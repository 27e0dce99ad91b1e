"""Soft Actor-Critic (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications").

An optax-style factory: :func:`sac` returns a :class:`SAC` of pure, jittable functions over a
:class:`SACState` (networks, target networks, log-temperature and three separate Adam states).
The policy is a tanh-squashed Gaussian ``pi(a | s)`` with actions in ``[-1, 1]^u`` (the runner
rescales them to the environment's bounds); ``K`` Q networks (twin critics, ``K = 2``) with
Polyak-averaged targets ``Q'_k``. With temperature ``alpha = exp(log_alpha)`` one update on a
batch ``(s, a, r, s', d)`` does, in this order (as in the paper's Algorithm 1, one gradient step
each, all on the same batch):

1. critic, soft Bellman target with ``a' ~ pi(. | s')`` (reparameterised)::

       y = c r + gamma d (min_k Q'_k(s', a') - alpha log pi(a' | s'))
       J_Q = sum_k 1/2 mean_n (Q_k(s_n, a_n) - y_n)^2            (y held fixed)

   ``c`` is ``reward_scale``, ``gamma`` the discount of the config and ``d`` the per-transition
   continuation of the batch (``0`` where the episode terminated, else ``1``; any value in
   ``[0, 1]`` is allowed);
2. actor, with the just-updated critics and ``a~ = tanh(mu(s) + sigma(s) eps)``::

       J_pi = mean_n (alpha log pi(a~_n | s_n) - min_k Q_k(s_n, a~_n))

3. temperature (automatic entropy tuning, Sec. 5), with the entropy estimate
   ``H = -mean_n log pi(a~_n | s_n)`` of step 2 and target entropy ``H_bar`` (default ``-u``)::

       J(alpha) = alpha (H - H_bar),  optimised in log_alpha

   so ``alpha`` grows while the policy's entropy is below target and shrinks above it;
4. targets, ``Q'_k <- (1 - tau) Q'_k + tau Q_k``.

Defaults follow KalMamba's Table 3 (Becker et al. 2024, low-dimensional DMC): 2x256 ReLU MLPs
for actor and critics, Adam with learning rate ``3e-4`` for actor, critic and temperature,
``tau = 0.005`` every update, target entropy ``-u``, initial ``alpha = 0.1``, ``gamma = 0.99``.
Gradient clipping by global norm is optional (``max_grad_norm``; off by default, applied to actor
and critic).

"SAC on the filtered belief" (KalMamba, Sec. 2): the agent is unchanged; its input vectors are
the means of the filtered beliefs ``q(z_t | o_{<=t}, a_{<t})`` that the runner computes with the
world model, gradients stopped. :func:`belief_transitions` turns filtered feature sequences into
the transitions ``(f_t, a_t, r_t, f_{t+1}, d_t)`` this agent trains on, and
:func:`sample_batches` draws stacked batches for :attr:`SAC.update_many` from such a
device-resident set of transitions.

Usage::

    agent = sac(obs_dim, action_dim)
    state = agent.init(key)
    update_many = jax.jit(agent.update_many)
    state, metrics = update_many(state, key, sample_batches(key2, transitions, 50, 256))
    action = jax.jit(agent.act, static_argnames="deterministic")(state, key, obs)
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rl.agents import Agent, _nets, no_memory

Batch = dict[str, jax.Array]
BATCH_KEYS = ("obs", "action", "reward", "next_obs", "discount")


class SACConfig(NamedTuple):
    """Hyper-parameters of :func:`sac` (defaults: KalMamba Table 3, low-dimensional DMC).

    Attributes:
        hidden: hidden layer sizes of actor and of each critic.
        activation: hidden activation (``jax.nn.relu``; ``jax.nn.elu`` for the image setting).
        num_q: number of critics ``K`` whose minimum is used (2: twin Q).
        actor_lr, critic_lr, alpha_lr: Adam learning rates.
        discount: ``gamma``; multiplied by each transition's own ``discount`` entry.
        tau: Polyak rate of the target critics (every update).
        init_alpha: initial temperature.
        target_entropy: ``H_bar``; ``None`` means ``-action_dim``.
        reward_scale: ``c``, multiplies rewards in the Bellman target.
        max_grad_norm: clip actor and critic gradients to this global norm; ``None``: no clipping.
        log_std_bounds: ``(lo, hi)`` of the policy's log standard deviation.
        dtype: parameter dtype (``None``: ``float``'s; inputs are cast to it).
    """

    hidden: tuple[int, ...] = (256, 256)
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    num_q: int = 2
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    init_alpha: float = 0.1
    target_entropy: float | None = None
    reward_scale: float = 1.0
    max_grad_norm: float | None = None
    log_std_bounds: tuple[float, float] = (-5.0, 2.0)
    dtype: Any = None


class SACState(NamedTuple):
    """Everything SAC learns; every leaf is an array (the state can be scanned and saved)."""

    actor: _nets.Params  # pure dict of a pssm.nets.MLP (rl.agents._nets.mlp)
    critic: _nets.Params  # K critics' pure dicts stacked on a leading axis
    target_critic: _nets.Params
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    step: jax.Array


class SAC(NamedTuple):
    """The functions of a SAC agent (pure; wrap them in ``jax.jit``).

    Attributes:
        init: ``key -> SACState``.
        act: ``(state, key, obs (..., p), deterministic=False) -> action (..., u)`` in
            ``[-1, 1]``: a sample of the policy, or ``tanh(mu(obs))`` where ``deterministic``
            (a bool, also a traced one: one compiled step serves acting and evaluation).
        update: ``(state, key, batch) -> (state, metrics)``: one update (module docstring) on
            ``batch = {"obs": (N, p), "action": (N, u), "reward": (N,), "next_obs": (N, p),
            "discount": (N,)}``. ``key`` is split into ``(k_critic, k_actor)``: the noise of
            ``a'`` is ``jax.random.normal(k_critic, (N, u))`` (see :attr:`critic_target`), that
            of ``a~`` is ``jax.random.normal(k_actor, (N, u))``. Metrics are scalars, among
            them ``"finite"`` (losses, gradients and temperature all finite).
        update_many: ``(state, key, batches) -> (state, metrics)``: ``M`` updates in one call,
            a ``lax.scan`` over the leading axis of ``batches`` (each leaf ``(M, N, ...)``, e.g.
            from :func:`sample_batches`) with keys ``jax.random.split(key, M)``; identical to
            ``M`` calls of ``update`` with those keys. Metrics are stacked ``(M,)``.
        critic_target: ``(state, key, batch) -> y (N,)``: the soft Bellman target with next
            actions from noise ``jax.random.normal(key, (N, u))``.
    """

    init: Callable[[jax.Array], SACState]
    act: Callable[..., jax.Array]
    update: Callable[[SACState, jax.Array, Batch], tuple[SACState, dict]]
    update_many: Callable[[SACState, jax.Array, Batch], tuple[SACState, dict]]
    critic_target: Callable[[SACState, jax.Array, Batch], jax.Array]


def _validate(obs_dim: int, action_dim: int, c: SACConfig) -> None:
    if int(obs_dim) < 1 or int(action_dim) < 1:
        raise ValueError(f"obs_dim and action_dim must be >= 1, got {obs_dim}, {action_dim}")
    if c.num_q < 1:
        raise ValueError(f"num_q must be >= 1, got {c.num_q}")
    if not 0.0 < c.tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {c.tau}")
    if not 0.0 <= c.discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {c.discount}")
    if not c.init_alpha > 0.0:
        raise ValueError(f"init_alpha must be positive, got {c.init_alpha}")
    if min(c.actor_lr, c.critic_lr, c.alpha_lr) < 0.0:
        raise ValueError("learning rates must be non-negative")
    if c.max_grad_norm is not None and not c.max_grad_norm > 0.0:
        raise ValueError(f"max_grad_norm must be positive or None, got {c.max_grad_norm}")
    lo, hi = c.log_std_bounds
    if not lo < hi:
        raise ValueError(f"log_std_bounds must satisfy lo < hi, got {c.log_std_bounds}")


def _check_batch(batch: Batch, obs_dim: int, action_dim: int, lead: int = 0) -> None:
    """Static shape checks; ``lead`` extra leading axes (``update_many``: one)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; needs {BATCH_KEYS}")
    shape = batch["reward"].shape
    if len(shape) != lead + 1:
        raise ValueError(f"reward must have {lead + 1} axes, got shape {shape}")
    want = {
        "obs": shape + (obs_dim,),
        "action": shape + (action_dim,),
        "reward": shape,
        "next_obs": shape + (obs_dim,),
        "discount": shape,
    }
    for k, s in want.items():
        if tuple(batch[k].shape) != s:
            raise ValueError(f"batch[{k!r}] has shape {batch[k].shape}, expected {s}")


def sac(obs_dim: int, action_dim: int, *, config: SACConfig | None = None) -> SAC:
    """Build a SAC agent for ``obs_dim``-dimensional inputs and ``action_dim`` actions.

    Args:
        obs_dim: size ``p`` of the input vectors (states, or belief means ``F``).
        action_dim: size ``u`` of the actions (in ``[-1, 1]``).
        config: hyper-parameters, see :class:`SACConfig` (``None``: the defaults).

    Returns:
        A :class:`SAC` of pure functions.
    """
    c = SACConfig() if config is None else config
    _validate(obs_dim, action_dim, c)
    p, u = int(obs_dim), int(action_dim)
    dtype = jnp.result_type(float) if c.dtype is None else c.dtype
    target_entropy = -float(u) if c.target_entropy is None else float(c.target_entropy)

    def _adam(lr):
        if c.max_grad_norm is None:
            return optax.adam(lr)
        return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), optax.adam(lr))

    actor_tx, critic_tx, alpha_tx = _adam(c.actor_lr), _adam(c.critic_lr), optax.adam(c.alpha_lr)

    actor_net = _nets.mlp(p, c.hidden, 2 * u, activation=c.activation, dtype=dtype)
    critic_net = _nets.ensemble(
        _nets.mlp(p + u, c.hidden, 1, activation=c.activation, dtype=dtype), c.num_q
    )

    def policy(actor, obs):
        return _nets.gaussian_head(actor_net.apply(actor, obs), c.log_std_bounds)

    def q_values(critic, obs, action):
        """``Q_k([obs, action])`` of every critic: ``(K, ...)``."""
        return critic_net.apply(critic, jnp.concatenate([obs, action], axis=-1))[..., 0]

    def cast(batch):
        return {k: jnp.asarray(batch[k], dtype) for k in BATCH_KEYS}

    def init(key):
        k_actor, k_critic = jax.random.split(key)
        actor, critic = actor_net.init(k_actor), critic_net.init(k_critic)
        log_alpha = jnp.asarray(jnp.log(c.init_alpha), dtype)
        return SACState(
            actor=actor,
            critic=critic,
            target_critic=jax.tree.map(jnp.copy, critic),
            log_alpha=log_alpha,
            actor_opt=actor_tx.init(actor),
            critic_opt=critic_tx.init(critic),
            alpha_opt=alpha_tx.init(log_alpha),
            step=jnp.zeros((), jnp.int32),
        )

    def act(state, key, obs, deterministic=False):
        obs = jnp.asarray(obs, dtype)
        if obs.shape[-1:] != (p,):
            raise ValueError(f"obs must end in ({p},), got shape {obs.shape}")
        mean, log_std = policy(state.actor, obs)
        noise = jax.random.normal(key, mean.shape, dtype)
        sample = _nets.tanh_gaussian_sample(mean, log_std, noise)[0]
        return jnp.where(deterministic, jnp.tanh(mean), sample)  # a traced flag too

    def _target(actor, target_critic, alpha, key, b):
        mean, log_std = policy(actor, b["next_obs"])
        noise = jax.random.normal(key, mean.shape, dtype)
        a_next, logp_next = _nets.tanh_gaussian_sample(mean, log_std, noise)
        q_next = jnp.min(q_values(target_critic, b["next_obs"], a_next), axis=0)
        soft_v = q_next - alpha * logp_next
        return c.reward_scale * b["reward"] + c.discount * b["discount"] * soft_v

    def critic_target(state, key, batch):
        _check_batch(batch, p, u)
        b = cast(batch)
        return _target(state.actor, state.target_critic, jnp.exp(state.log_alpha), key, b)

    def update(state, key, batch):
        _check_batch(batch, p, u)
        b = cast(batch)
        k_critic, k_actor = jax.random.split(key)
        alpha = jnp.exp(state.log_alpha)

        # 1. critics towards the soft Bellman target
        y = jax.lax.stop_gradient(_target(state.actor, state.target_critic, alpha, k_critic, b))

        def critic_loss(critic):
            q = q_values(critic, b["obs"], b["action"])  # (K, N)
            return 0.5 * jnp.sum(jnp.mean((q - y) ** 2, axis=-1)), q

        (loss_q, q), g_critic = jax.value_and_grad(critic_loss, has_aux=True)(state.critic)
        upd, critic_opt = critic_tx.update(g_critic, state.critic_opt, state.critic)
        critic = optax.apply_updates(state.critic, upd)

        # 2. actor against the updated critics
        noise = jax.random.normal(k_actor, (b["obs"].shape[0], u), dtype)

        def actor_loss(actor):
            mean, log_std = policy(actor, b["obs"])
            a, logp = _nets.tanh_gaussian_sample(mean, log_std, noise)
            q_pi = jnp.min(q_values(critic, b["obs"], a), axis=0)
            return jnp.mean(alpha * logp - q_pi), logp

        (loss_pi, logp), g_actor = jax.value_and_grad(actor_loss, has_aux=True)(state.actor)
        upd, actor_opt = actor_tx.update(g_actor, state.actor_opt, state.actor)
        actor = optax.apply_updates(state.actor, upd)

        # 3. temperature: J(alpha) = alpha (H - H_bar), in log alpha
        entropy = -jnp.mean(jax.lax.stop_gradient(logp))

        def alpha_loss(log_alpha):
            return jnp.exp(log_alpha) * (entropy - target_entropy)

        loss_alpha, g_alpha = jax.value_and_grad(alpha_loss)(state.log_alpha)
        upd, alpha_opt = alpha_tx.update(g_alpha, state.alpha_opt, state.log_alpha)
        log_alpha = optax.apply_updates(state.log_alpha, upd)

        # 4. Polyak-averaged target critics
        target_critic = _nets.polyak(state.target_critic, critic, c.tau)

        gn_critic, gn_actor = optax.tree.norm(g_critic), optax.tree.norm(g_actor)
        checked = jnp.stack([loss_q, loss_pi, loss_alpha, gn_critic, gn_actor, log_alpha])
        metrics = {
            "critic_loss": loss_q,
            "actor_loss": loss_pi,
            "alpha_loss": loss_alpha,
            "alpha": alpha,
            "entropy": entropy,
            "q_mean": jnp.mean(q),
            "target_mean": jnp.mean(y),
            "critic_grad_norm": gn_critic,
            "actor_grad_norm": gn_actor,
            "finite": jnp.all(jnp.isfinite(checked)),
        }
        new = SACState(
            actor=actor,
            critic=critic,
            target_critic=target_critic,
            log_alpha=log_alpha,
            actor_opt=actor_opt,
            critic_opt=critic_opt,
            alpha_opt=alpha_opt,
            step=state.step + 1,
        )
        return new, metrics

    def update_many(state, key, batches):
        _check_batch(batches, p, u, lead=1)
        keys = jax.random.split(key, batches["reward"].shape[0])
        xs = (keys, {k: batches[k] for k in BATCH_KEYS})
        return jax.lax.scan(lambda s, x: update(s, x[0], x[1]), state, xs)

    return SAC(init, act, update, update_many, critic_target)


def belief_transitions(
    features: jax.Array, actions: jax.Array, rewards: jax.Array, discounts: jax.Array
) -> Batch:
    """Transitions ``(f_t, a_t, r_t, f_{t+1}, d_t)`` from filtered feature sequences.

    The time convention is :mod:`rl.world_model`'s: ``actions[:, t]`` is taken after observing
    step ``t`` and ``rewards[:, t]`` / ``discounts[:, t]`` are received for it (``d_t = 0`` when
    the episode ended on arriving at ``t + 1``). ``features[:, t]`` is the filtered belief mean
    after observing step ``t``; gradients into the world model are stopped (KalMamba's SAC).

    Args:
        features: ``(B, T, F)``, ``T >= 2``.
        actions: ``(B, T, u)``.
        rewards: ``(B, T)``.
        discounts: ``(B, T)``.

    Returns:
        A batch for :attr:`SAC.update` with ``N = B (T - 1)`` transitions, ordered sequence by
        sequence (transition ``(b, t)`` at row ``b (T - 1) + t``); the last step of each
        sequence has no successor and gives no transition.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (B, T, F), got shape {features.shape}")
    B, T, F = features.shape
    if T < 2:
        raise ValueError(f"need T >= 2 steps for a transition, got T={T}")
    if actions.ndim != 3 or actions.shape[:2] != (B, T):
        raise ValueError(f"actions must be ({B}, {T}, u), got shape {actions.shape}")
    for name, x in (("rewards", rewards), ("discounts", discounts)):
        if x.shape != (B, T):
            raise ValueError(f"{name} must be ({B}, {T}), got shape {x.shape}")
    f = jax.lax.stop_gradient(features)
    n = B * (T - 1)
    return {
        "obs": f[:, :-1].reshape(n, F),
        "action": actions[:, :-1].reshape(n, actions.shape[-1]),
        "reward": rewards[:, :-1].reshape(n),
        "next_obs": f[:, 1:].reshape(n, F),
        "discount": discounts[:, :-1].reshape(n),
    }


def sample_batches(key: jax.Array, transitions: Batch, num_batches: int, batch_size: int) -> Batch:
    """``num_batches`` batches of ``batch_size`` transitions drawn uniformly with replacement.

    ``transitions`` holds ``M`` transitions (leaves ``(M, ...)``, e.g. from
    :func:`belief_transitions` or a device-resident replay); the result has leaves
    ``(num_batches, batch_size, ...)`` for :attr:`SAC.update_many`. Jittable with
    ``num_batches`` and ``batch_size`` static.
    """
    sizes = {jnp.shape(v)[0] for v in transitions.values()}
    if len(sizes) != 1:
        raise ValueError(f"transition leaves disagree on their leading size: {sorted(sizes)}")
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"need num_batches, batch_size >= 1, got {num_batches}, {batch_size}")
    idx = jax.random.randint(key, (num_batches, batch_size), 0, sizes.pop())
    return {k: jnp.asarray(v)[idx] for k, v in transitions.items()}


def belief_agent(wm, config: SACConfig | None = None, *, batch_size: int = 256,
                 sequences: int = 16):  # fmt: skip
    """SAC on the features of a world model's filtered belief, as an :class:`rl.agents.Agent`
    (KalMamba's setting, Becker et al. 2024, Sec. 4: the agent's gradients stop at the model).

    A training call turns the filtered beliefs of ``sequences`` replayed windows into
    transitions (:func:`belief_transitions`) and takes ``updates`` SAC steps on minibatches of
    ``batch_size`` drawn from them (:func:`sample_batches`).
    """
    agent = sac(wm.feature_size, wm.action_dim, config=config)

    def act(params, state, memory, belief, key, explore):
        f = jax.lax.stop_gradient(wm.features(params, belief))
        return agent.act(state, key, f, deterministic=jnp.logical_not(explore)), memory

    def update(params, state, key, beliefs, batch, updates: int):
        k_batch, k_update = jax.random.split(key)
        N, T = batch["rewards"].shape
        f = wm.features(params, jax.tree.map(lambda v: v.reshape(N * T, *v.shape[2:]), beliefs))
        # replay's discounts[:, t] belong to arriving at t; a transition t -> t + 1 needs t + 1's
        d = batch["discounts"]
        d = jnp.concatenate([d[:, 1:], jnp.ones_like(d[:, :1])], axis=1)
        tr = belief_transitions(f.reshape(N, T, -1), batch["actions"], batch["rewards"], d)
        state, metrics = agent.update_many(state, k_update, sample_batches(k_batch, tr, updates,
                                                                           batch_size))  # fmt: skip
        return state, jax.tree.map(jnp.mean, metrics)

    return Agent(agent.init, no_memory, act, update, lambda updates: int(sequences))
