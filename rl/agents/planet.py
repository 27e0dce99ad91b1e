"""PlaNet: model-predictive control by the cross-entropy method in a world model's latent space.

Hafner et al. (2019), "Learning Latent Dynamics for Planning from Pixels", ICML, Sec. 3 and
Algorithm 2. At every environment step the agent updates its belief with the new observation
(online filtering through the :class:`rl.world_model.WorldModel` protocol, the time convention
of :mod:`rl.world_model`)::

    b_0 = observe(init_belief, o_0)               (first step of an episode)
    b_t = observe(imagine(b_{t-1}, a_{t-1}), o_t)  (later steps)

and then searches for an action sequence ``a_{t:t+H-1}`` in ``[-1, 1]^{H x u}`` that maximises
the predicted return ``G = sum_{k=0}^{H-1} gamma^k reward(features(b_{t+k+1}))``, where
``b_{t+k+1} = imagine(b_{t+k}, a_{t+k})``. The cross-entropy method (CEM; Rubinstein 1997)
keeps a diagonal Gaussian ``N(mu, diag(sigma^2))`` over action sequences and, for ``I``
iterations, draws ``J`` candidates ``clip(mu + sigma * eps, -1, 1)``, evaluates them all in one
batched imagination, and refits ``(mu, sigma)`` to the ``K`` best (mean and standard deviation of
the elites). The agent executes ``mu_0`` (plus Gaussian exploration noise while collecting data).

Departures from the paper, both optional: the Gaussian is warm-started from the previous step's
plan shifted by one step (the new last step gets ``N(0, init_std^2)``) rather than reset to
``N(0, 1)``; and with ``per_candidate_keys`` each candidate's imagination gets its own key, so
models whose ``imagine`` samples (stochastic states, MC-dropout masks) draw an independent
dynamics sample per candidate.

Usage::

    agent = planet(wm, PLANET_CPU)
    state = agent.init(params, 1)
    action, state = agent.act(params, state, key, obs, mask, True)   # obs (1, ...)
    ...
    state = agent.reset(state)            # at the end of an episode
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rl.world_model import WorldModel

PyTree = Any


class PlanetConfig(NamedTuple):
    """CEM planner settings (defaults: PlaNet's, Hafner et al. 2019, Sec. 3).

    Attributes:
        horizon: planning horizon ``H``.
        candidates: action sequences ``J`` drawn per iteration.
        iterations: CEM iterations ``I``.
        top_k: elites ``K`` refitted to.
        init_std: initial (and newly appended) standard deviation of the action Gaussian.
        discount: ``gamma`` of the planned return (``1``: PlaNet's undiscounted sum).
        explore_noise: standard deviation of the Gaussian noise added to the action when
            ``explore`` is true (clipped to ``[-1, 1]`` afterwards).
        shift_std: warm-start the standard deviations too (``False``: only the means are
            shifted, the standard deviations restart at ``init_std``).
        per_candidate_keys: one imagination key per candidate (independent dynamics samples);
            ``False`` tiles the belief over the candidates and imagines them with one key.
    """

    horizon: int = 12
    candidates: int = 1000
    iterations: int = 10
    top_k: int = 100
    init_std: float = 1.0
    discount: float = 1.0
    explore_noise: float = 0.3
    shift_std: bool = True
    per_candidate_keys: bool = True


#: A budget that plans in well under a second per action on two CPU cores.
PLANET_CPU = PlanetConfig(horizon=12, candidates=300, iterations=5, top_k=30)


class PlannerState(NamedTuple):
    """The planner's state for ``B`` parallel episodes.

    Attributes:
        belief: the filtered belief after the last observation, ``(B, ...)`` leaves.
        prev_action: ``(B, u)``: the action executed last (drives the next ``imagine``).
        first: ``(B,)`` bool: the next observation starts an episode (filter from the prior).
        mean: ``(B, H, u)`` warm-start mean of the action-sequence Gaussian.
        std: ``(B, H, u)`` its standard deviations.
    """

    belief: PyTree
    prev_action: jax.Array
    first: jax.Array
    mean: jax.Array
    std: jax.Array


class Planet(NamedTuple):
    """PlaNet's pure functions (all jitted; see :func:`planet`)."""

    init: Callable[..., PlannerState]
    act: Callable[..., tuple[jax.Array, PlannerState]]
    reset: Callable[..., PlannerState]
    plan: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    returns: Callable[..., jax.Array]


def _select(pred, on_true, on_false):
    """Per-episode ``where`` over pytrees with a leading batch axis ``(B, ...)``."""

    def sel(x, y):
        return jnp.where(pred.reshape(pred.shape + (1,) * (jnp.ndim(y) - 1)), x, y)

    return jax.tree.map(sel, on_true, on_false)


def observe_step(wm: WorldModel, params, key, belief, prev_action, first, obs, mask):
    """One step of online filtering: ``b_t = observe(imagine(b_{t-1}, a_{t-1}), o_t)``, or
    ``observe(init_belief, o_0)`` for the episodes flagged ``first`` ``(B,)``."""
    k_imagine, k_observe = jax.random.split(key)
    batch = jnp.shape(first)[0]
    predicted = wm.imagine(params, k_imagine, belief, prev_action)
    prior = wm.init_belief(params, batch)
    prior = jax.tree.map(lambda p, b: jnp.broadcast_to(p, jnp.shape(b)), prior, predicted)
    return wm.observe(params, k_observe, _select(first, prior, predicted), obs, mask)


def reset_episodes(first, prev_action, done):
    """Flags ``done`` ``(B,)`` episodes (all when ``None``) to restart at the next step."""
    done = jnp.ones_like(first) if done is None else jnp.asarray(done, bool)
    if done.shape != first.shape:
        raise ValueError(f"done must have shape {first.shape}, got {done.shape}")
    return first | done, jnp.where(done[:, None], 0.0, prev_action), done


def _validate(config: PlanetConfig):
    if config.horizon < 1 or config.iterations < 1:
        raise ValueError(f"horizon and iterations must be >= 1, got {config}")
    if not 1 <= config.top_k <= config.candidates:
        raise ValueError(
            f"need 1 <= top_k <= candidates, got top_k={config.top_k}, "
            f"candidates={config.candidates}"
        )
    if config.init_std <= 0 or config.explore_noise < 0:
        raise ValueError(f"need init_std > 0 and explore_noise >= 0, got {config}")
    if not 0 < config.discount <= 1:
        raise ValueError(f"discount must lie in (0, 1], got {config.discount}")


def planet(wm: WorldModel, config: PlanetConfig | None = None) -> Planet:
    """A CEM planner over the world model ``wm``.

    Returns:
        A :class:`Planet` of jitted pure functions (``params`` are the model's constrained
        parameters, as :mod:`rl.world_model` takes them):

        - ``init(params, batch_size=1) -> PlannerState``;
        - ``act(params, state, key, obs, mask, explore) -> (action (B, u), state)``: filter the
          new observation, plan, and return the first planned action (with exploration noise
          where ``explore``; a traced bool, so one compiled function serves both);
        - ``reset(state, done=None) -> state``: start new episodes (all, or where ``done``);
        - ``plan(params, belief, key, mean, std) -> (mean, std, best_return)``: CEM from a
          belief ``(B, ...)`` with initial ``(B, H, u)`` Gaussian; ``best_return`` ``(B,)`` is
          the best candidate's return in the last iteration;
        - ``returns(params, belief, key, actions) -> (B, J)``: predicted returns of candidate
          sequences ``actions`` ``(B, J, H, u)``.
    """
    config = PlanetConfig() if config is None else config
    _validate(config)
    H, J, K, u = config.horizon, config.candidates, config.top_k, wm.action_dim
    discounts = np.power(config.discount, np.arange(H))

    def rollout(params, belief, actions, key):
        """Returns ``(n,)`` of sequences ``actions`` ``(n, H, u)`` from ``belief`` ``(n, ...)``."""

        def step(b, xs):
            k, a = xs
            b = wm.imagine(params, k, b, a)
            return b, wm.reward(params, wm.features(params, b))

        keys = jax.random.split(key, H)
        _, rewards = jax.lax.scan(step, belief, (keys, jnp.moveaxis(actions, 1, 0)))
        return jnp.tensordot(jnp.asarray(discounts, rewards.dtype), rewards, axes=1)

    def returns_one(params, belief, key, actions):
        """Returns ``(J,)`` of ``actions`` ``(J, H, u)`` from one episode's belief (no batch)."""
        n = actions.shape[0]
        if config.per_candidate_keys:
            b1 = jax.tree.map(lambda x: x[None], belief)

            def one(a, k):
                return rollout(params, b1, a[None], k)[0]

            return jax.vmap(one)(actions, jax.random.split(key, n))
        tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), belief)
        return rollout(params, tiled, actions, key)

    def cem_one(params, belief, key, mean, std):
        def iteration(carry, k):
            mean, std, _ = carry
            k_sample, k_dyn = jax.random.split(k)
            eps = jax.random.normal(k_sample, (J, H, u), mean.dtype)
            candidates = jnp.clip(mean + std * eps, -1.0, 1.0)
            ret = returns_one(params, belief, k_dyn, candidates)
            best, idx = jax.lax.top_k(ret, K)
            elites = candidates[idx]
            return (elites.mean(0), elites.std(0), best[0]), None

        init = (mean, std, jnp.zeros((), mean.dtype))
        (mean, std, best), _ = jax.lax.scan(
            iteration, init, jax.random.split(key, config.iterations)
        )
        return mean, std, best

    def _check_plan(mean, std, batch):
        if mean.shape != (batch, H, u) or std.shape != (batch, H, u):
            raise ValueError(
                f"mean and std must have shape {(batch, H, u)}, got {mean.shape}, {std.shape}"
            )

    @jax.jit
    def plan(params, belief, key, mean, std):
        batch = mean.shape[0]
        _check_plan(mean, std, batch)
        keys = jax.random.split(key, batch)
        return jax.vmap(lambda b, k, m, s: cem_one(params, b, k, m, s))(belief, keys, mean, std)

    @jax.jit
    def returns(params, belief, key, actions):
        if actions.ndim != 4 or actions.shape[2:] != (H, u):
            raise ValueError(f"actions must have shape (B, J, {H}, {u}), got {actions.shape}")
        keys = jax.random.split(key, actions.shape[0])
        return jax.vmap(lambda b, k, a: returns_one(params, b, k, a))(belief, keys, actions)

    def _fresh_plan(batch, dtype):
        return jnp.zeros((batch, H, u), dtype), jnp.full((batch, H, u), config.init_std, dtype)

    def init(params, batch_size: int = 1) -> PlannerState:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype = jnp.result_type(float)
        mean, std = _fresh_plan(batch_size, dtype)
        return PlannerState(
            belief=wm.init_belief(params, batch_size),
            prev_action=jnp.zeros((batch_size, u), dtype),
            first=jnp.ones((batch_size,), bool),
            mean=mean,
            std=std,
        )

    def act(params, state: PlannerState, key, obs, mask, explore):
        batch = state.first.shape[0]
        k_filter, k_plan, k_noise = jax.random.split(key, 3)
        belief = observe_step(
            wm, params, k_filter, state.belief, state.prev_action, state.first, obs, mask
        )
        mean, std, _ = plan(params, belief, k_plan, state.mean, state.std)
        action = mean[:, 0]
        noise = config.explore_noise * jax.random.normal(k_noise, action.shape, action.dtype)
        action = jnp.clip(action + jnp.where(explore, noise, 0.0), -1.0, 1.0)
        new_mean, new_std = _fresh_plan(batch, mean.dtype)
        new_mean = new_mean.at[:, :-1].set(mean[:, 1:])
        if config.shift_std:
            new_std = new_std.at[:, :-1].set(std[:, 1:])
        state = PlannerState(belief, action, jnp.zeros_like(state.first), new_mean, new_std)
        return action, state

    def reset(state: PlannerState, done=None) -> PlannerState:
        first, prev_action, done = reset_episodes(state.first, state.prev_action, done)
        fresh_mean, fresh_std = _fresh_plan(first.shape[0], state.mean.dtype)
        d = done[:, None, None]
        return state._replace(
            first=first,
            prev_action=prev_action,
            mean=jnp.where(d, fresh_mean, state.mean),
            std=jnp.where(d, fresh_std, state.std),
        )

    return Planet(
        init=jax.jit(init, static_argnums=1),
        act=jax.jit(act),
        reset=jax.jit(reset),
        plan=plan,
        returns=returns,
    )
