"""The world-model protocol: a learned SSM as the agents see it.

Agents (PlaNet, Dreamer, SAC on beliefs) never touch a concrete model. They receive a
:class:`WorldModel`: the model's training objective plus a handful of pure, jittable functions
of the model's *constrained* parameters ``params = objective.constrain(train_params)``.

A belief is any pytree with a leading batch axis ``(B, ...)`` (RSSM: ``(h, z)``; Kalman models:
the filtered Gaussian, plus whatever memory the transition network keeps). Filtering a
sequence alternates the two steps, with the time convention of :mod:`pssm.core` (the action
``a_t`` drives ``z_t -> z_{t+1}``)::

    b = init_belief(params, B)                 # p(z_0) before any observation
    b = observe(params, key, b, o_0, m_0)      # condition on o_0          (filtering update)
    b = imagine(params, key, b, a_0)           # predict z_1 through a_0  (prior step)
    b = observe(params, key, b, o_1, m_1)      ...

``imagine`` alone rolls the model forward without observations (planning, imagined
trajectories); it may sample (RSSM: ``z ~ p(z | h)``; Kalman models: a sample of the state
pushed through the transition) and must be differentiable in ``params`` and in the belief
(Dreamer backpropagates returns through it). ``features(params, b)`` ``(B, F)`` is what actor,
critic, reward head and SAC see (RSSM: ``[h, z]``; Kalman models: the belief mean).
``reward(params, f)`` predicts the reward received on *arriving* in a state, so the reward of
``a_t`` is ``reward(features(imagine(b_t, a_t)))``.

Data a world model trains on (``objective``'s batch, sequences from :mod:`rl.replay`)::

    {"obs": (B, T, ...) or {modality: (B, T, ...)}, "actions": (B, T, u),
     "rewards": (B, T), "mask": (B, T) or (B, T, K)}

with ``actions[:, t]`` taken at ``obs[:, t]`` and ``rewards[:, t]`` received for it (scored
against ``reward(features(z_{t+1}))``; the last step's reward has no successor and is not
scored), and, where the replay holds them (an occluded task), ``"pixel_mask"``: per-pixel
likelihood masks ``(B, T, H, W)`` (or ``{"image": ...}``) that only the model's program reads
(:func:`pssm.inputs.gaussian_observations`: occluded pixels contribute nothing to the
reconstruction, VRKN Sec. 4.2); :func:`from_parts` hands its guide the batch without them.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers

from inference.evaluation import filter_beliefs, imagine_rollout  # noqa: F401 (re-exported)
from inference.training import Objective, elbo_objective
from pssm.core import ActingModel, require

PyTree = Any


class WorldModel(NamedTuple):
    """A learned model for agents (see the module docstring for the time convention).

    Attributes:
        objective: trains the model on sequence batches ``{"obs", "actions", "rewards",
            "mask"}`` (an :class:`inference.training.Objective`).
        init_belief: ``(params, batch_size) -> belief``: the prior of ``z_0``.
        observe: ``(params, key, belief, obs_t, mask_t) -> belief``: condition on one step's
            observation (``obs_t`` ``(B, ...)`` or a dict of them; ``mask_t`` ``(B,)``,
            ``(B, K)`` or ``None`` for fully observed); a masked step leaves the belief as is.
        imagine: ``(params, key, belief, action) -> belief``: one prior step under ``action``
            ``(B, u)``, no observation.
        features: ``(params, belief) -> (B, F)``.
        reward: ``(params, features (..., F)) -> (...)``: predicted reward of arriving there.
        feature_size: ``F``.
        action_dim: ``u``.
        decode: optional ``(params, features (..., F)) -> obs mean`` (array or dict, like
            ``obs``), for reconstructions and open-loop predictions.
        filter_sequence: optional ``(params, key, obs, actions, mask) -> beliefs`` with a
            leading ``(B, T)`` on every leaf, the beliefs *after* observing each ``o_t``; when
            ``None``, :func:`filter_sequence` scans ``observe`` / ``imagine``. Models with a
            time-parallel filter (KalMamba) provide their own.
    """

    objective: Objective
    init_belief: Callable[[PyTree, int], PyTree]
    observe: Callable[..., PyTree]
    imagine: Callable[[PyTree, jax.Array, PyTree, jax.Array], PyTree]
    features: Callable[[PyTree, PyTree], jax.Array]
    reward: Callable[[PyTree, jax.Array], jax.Array]
    feature_size: int
    action_dim: int
    decode: Callable[[PyTree, jax.Array], Any] | None = None
    filter_sequence: Callable[..., PyTree] | None = None


def filter_sequence(wm: WorldModel, params, key, obs, actions, mask=None) -> PyTree:
    """Beliefs after each observation: ``b_t = p(z_t | o_{0:t}, a_{0:t-1})``, ``(B, T, ...)``.

    Uses ``wm.filter_sequence`` when the model has one, else scans ``observe`` and ``imagine``
    (``actions[:, t]`` moves ``b_t`` to the prior of ``z_{t+1}``; the last action is unused):
    :func:`inference.evaluation.filter_beliefs`.
    """
    return filter_beliefs(wm, params, key, obs, actions, mask)


def observe_step(wm: WorldModel, params, key, belief, prev_action, first, obs, mask):
    """The online filter, one step for ``B`` running episodes:
    ``b_t = observe(imagine(b_{t-1}, a_{t-1}), o_t)``, or ``observe(init_belief, o_0)`` where
    ``first`` ``(B,)`` flags an episode's first observation."""
    k_imagine, k_observe = jax.random.split(key)
    batch = jnp.shape(first)[0]
    predicted = wm.imagine(params, k_imagine, belief, prev_action)
    prior = wm.init_belief(params, batch)
    prior = jax.tree.map(lambda p, b: jnp.broadcast_to(p, jnp.shape(b)), prior, predicted)
    return wm.observe(params, k_observe, select(first, prior, predicted), obs, mask)


def select(pred, on_true, on_false):
    """Per-episode ``where`` over pytrees with a leading batch axis ``(B, ...)``."""

    def sel(x, y):
        return jnp.where(pred.reshape(pred.shape + (1,) * (jnp.ndim(y) - 1)), x, y)

    return jax.tree.map(sel, on_true, on_false)


class Acting(NamedTuple):
    """``B`` running episodes of an agent: the filtered ``belief`` after the last observation,
    the agent's per-episode ``memory`` (PlaNet's warm-started plan; ``()`` for most agents),
    the action executed last ``(B, u)`` and ``first`` ``(B,)``: the next observation starts an
    episode."""

    belief: PyTree
    memory: PyTree
    prev_action: jax.Array
    first: jax.Array


def start_acting(wm: WorldModel, agent, params, batch_size: int = 1) -> Acting:
    """:class:`Acting` for ``batch_size`` episodes that have not started yet."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dtype = jnp.result_type(float)
    return Acting(
        wm.init_belief(params, batch_size),
        agent.memory(params, batch_size),
        jnp.zeros((batch_size, wm.action_dim), dtype),
        jnp.ones((batch_size,), bool),
    )


def act(wm: WorldModel, agent, params, state, acting: Acting, key, obs, mask, explore):
    """One environment step of any agent (:class:`rl.agents.Agent`) on ``wm``: filter ``obs``
    (:func:`observe_step`), restart the memory of starting episodes, and let the agent choose
    from the belief. Returns ``(action (B, u), acting)``."""
    k_filter, k_act = jax.random.split(key)
    belief = observe_step(
        wm, params, k_filter, acting.belief, acting.prev_action, acting.first, obs, mask
    )
    fresh = agent.memory(params, acting.first.shape[0])
    memory = select(acting.first, fresh, acting.memory)
    action, memory = agent.act(params, state, memory, belief, k_act, explore)
    action = action.astype(acting.prev_action.dtype)
    return action, Acting(belief, memory, action, jnp.zeros_like(acting.first))


def reset_acting(acting: Acting, done=None) -> Acting:
    """Flag the ``done`` ``(B,)`` episodes (all when ``None``) to restart at the next step."""
    done = jnp.ones_like(acting.first) if done is None else jnp.asarray(done, bool)
    if done.shape != acting.first.shape:
        raise ValueError(f"done must have shape {acting.first.shape}, got {done.shape}")
    prev = jnp.where(done[:, None], 0.0, acting.prev_action)
    return acting._replace(first=acting.first | done, prev_action=prev)


def belief_world_model(model, objective: Objective, **step_options) -> WorldModel:
    """The world model of any model offering a belief step (:mod:`pssm.belief`) with a
    reward head: each function runs ``model.belief_step(**step_options)`` under the given
    parameters, so agents filter with the very step the model's program scans. No per-family
    code: a user's own model acts through this as the built-in families do."""
    require(model, ActingModel, "belief_world_model")  # the belief step (pssm.belief) and sizes

    def step(params):
        with handlers.substitute(data=params):
            return model.belief_step(**step_options)

    def reward(params, f):
        head = step(params).reward
        if head is None:
            raise ValueError("the model has no reward head: build it with one to act")
        return head(f)

    def decode(params, f):
        return step(params).decode(f)

    def filter_sequence(params, key, obs, actions, mask=None):
        return step(params).filter(obs, actions, mask, key)

    with handlers.seed(rng_seed=0), handlers.trace():  # which optional parts the model fills
        offered = model.belief_step(**step_options)

    return WorldModel(
        objective=objective,
        init_belief=lambda params, batch_size: step(params).init(batch_size),
        observe=lambda params, key, b, obs, mask=None: step(params).condition(b, obs, mask, key),
        imagine=lambda params, key, b, action: step(params).predict(b, action, key),
        features=lambda params, b: step(params).features(b),
        reward=reward,
        feature_size=int(model.feature_size),
        action_dim=int(model.action_dim),
        decode=None if offered.decode is None else decode,
        filter_sequence=None if offered.filter is None else filter_sequence,
    )


class ModelParts(NamedTuple):
    """A model with what trains it and how it acts: the pieces a world model is made of, and
    what an experiment that only trains and evaluates the model (system identification,
    benchmarks) uses without the agent-facing wrapper.

    Attributes:
        model: a NumPyro program offering a belief step (:class:`pssm.core.ActingModel`).
        guide: its guide.
        elbo: the NumPyro ELBO (or :class:`inference.training.MetricsELBO` wrapper) it trains
            with.
        step_options: keyword arguments of ``model.belief_step`` when acting (e.g. the RSSM
            guide's ``posterior``, EKVAE's ``encoder``).
    """

    model: Any
    guide: Any
    elbo: Any
    step_options: dict = {}


def without_pixel_mask(guide):
    """``guide`` called with a batch that may hold ``pixel_mask`` (read by the model only: a
    guide's encoders see the whole, occluded image); keeps the guide's attributes."""

    @functools.wraps(guide)
    def wrapped(*args, pixel_mask=None, **kwargs):
        return guide(*args, **kwargs)

    return wrapped


def from_parts(parts: ModelParts) -> WorldModel:
    """The world model of ``parts``: ``-ELBO`` of model and guide as the objective, acting by
    the model's belief step (:func:`belief_world_model`). The model takes the batch as it is,
    per-pixel masks included; the guide without them (:func:`without_pixel_mask`)."""
    objective = elbo_objective(parts.model, without_pixel_mask(parts.guide), parts.elbo)
    return belief_world_model(parts.model, objective, **parts.step_options)
