"""PlaNet: model-predictive control by the cross-entropy method in a world model's latent space.

Hafner et al. (2019), "Learning Latent Dynamics for Planning from Pixels", ICML, Sec. 3 and
Algorithm 2. At every environment step the belief is updated with the new observation (the
online filter :func:`rl.world_model.observe_step`, run for every agent by
:func:`rl.world_model.act`)::

    b_0 = observe(init_belief, o_0)               (first step of an episode)
    b_t = observe(imagine(b_{t-1}, a_{t-1}), o_t)  (later steps)

and the planner then searches for an action sequence ``a_{t:t+H-1}`` in ``[-1, 1]^{H x u}``
that maximises the predicted return ``G = sum_{k=0}^{H-1} gamma^k reward(features(b_{t+k+1}))``,
where ``b_{t+k+1} = imagine(b_{t+k}, a_{t+k})``. The cross-entropy method (CEM; Rubinstein 1997)
keeps a diagonal Gaussian ``N(mu, diag(sigma^2))`` over action sequences and, for ``I``
iterations, draws ``J`` candidates ``clip(mu + sigma * eps, -1, 1)``, evaluates them all in one
batched imagination, and refits ``(mu, sigma)`` to the ``K`` best (mean and standard deviation of
the elites). The agent executes ``mu_0`` (plus Gaussian exploration noise while collecting data).

Departures from the paper, both optional: the Gaussian is warm-started from the previous step's
plan shifted by one step (the new last step gets ``N(0, init_std^2)``) rather than reset to
``N(0, 1)``; and with ``per_candidate_keys`` each candidate's imagination gets its own key, so
models whose ``imagine`` samples (stochastic states, MC-dropout masks) draw an independent
dynamics sample per candidate.

Usage (an :class:`rl.agents.Agent`; :func:`rl.world_model.act` filters and calls it)::

    agent = planet(wm, PLANET_CPU)
    acting = start_acting(wm, agent, params, 1)
    action, acting = act(wm, agent, params, (), acting, key, obs, mask, True)   # obs (1, ...)
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rl.world_model import WorldModel, imagine_rollout

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


class Plan(NamedTuple):
    """The warm-started action-sequence Gaussian of ``B`` episodes (PlaNet's acting memory):
    ``mean`` and ``std`` ``(B, H, u)``."""

    mean: jax.Array
    std: jax.Array


class Planet(NamedTuple):
    """PlaNet's pure functions (see :func:`planet`); the first five are :class:`rl.agents.Agent`."""

    init: Callable[..., Any]
    memory: Callable[..., Plan]
    act: Callable[..., tuple[jax.Array, Plan]]
    update: None
    sequences: Callable[[int], int]
    plan: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    returns: Callable[..., jax.Array]


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

        - ``init(key) -> ()``: a planner learns nothing; ``update`` is ``None``;
        - ``memory(params, batch_size) -> Plan``: ``N(0, init_std^2)`` over the horizon;
        - ``act(params, state, plan, belief, key, explore) -> (action (B, u), plan)``: plan from
          the filtered belief, return the first planned action (with exploration noise where
          ``explore``; a traced bool, so one compiled function serves both) and the plan
          shifted by one step;
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
        _, _, rewards = imagine_rollout(wm, params, key, belief, actions=actions)
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

    def memory(params, batch_size: int = 1) -> Plan:
        return Plan(*_fresh_plan(batch_size, jnp.result_type(float)))

    def act(params, state, memory: Plan, belief, key, explore):
        k_plan, k_noise = jax.random.split(key)
        mean, std, _ = plan(params, belief, k_plan, memory.mean, memory.std)
        action = mean[:, 0]
        noise = config.explore_noise * jax.random.normal(k_noise, action.shape, action.dtype)
        action = jnp.clip(action + jnp.where(explore, noise, 0.0), -1.0, 1.0)
        new_mean, new_std = _fresh_plan(mean.shape[0], mean.dtype)
        new_mean = new_mean.at[:, :-1].set(mean[:, 1:])
        if config.shift_std:
            new_std = new_std.at[:, :-1].set(std[:, 1:])
        return action, Plan(new_mean, new_std)

    return Planet(
        init=lambda key: (),
        memory=memory,
        act=act,
        update=None,
        sequences=lambda updates: 0,
        plan=plan,
        returns=returns,
    )
