"""Drivers: one agent (with its world model, if any) as the runner drives it.

A :class:`Driver` bundles the pieces the loop in :mod:`rl.runner` calls: ``init`` builds the
whole learner state (a pytree: world-model :class:`inference.training.TrainState`, agent state),
``policy`` returns an acting :class:`Policy` for one episode (it keeps the episode's online
filtered belief), ``train`` runs one training call on replay, ``report`` writes figures at the
end. The agents themselves are pure functions (:mod:`rl.agents`); drivers only jit, batch and
feed them. Every model-based agent runs through the one generic :func:`model_driver` (one
online filter, one world-model trainer, one agent protocol :class:`rl.agents.Agent`); a new
agent is a module returning an ``Agent`` plus its line in :data:`MODEL_AGENTS`.

Agents (:data:`AGENTS`):

* ``random``: uniform actions (the baseline every run also evaluates);
* ``sac``: SAC on raw state observations;
* ``sac-belief``: SAC on the features of a world model's filtered belief, world model trained
  alongside on replayed sequences, agent gradients stopped at the model (KalMamba's setting);
* ``dreamer``: actor-critic on imagined trajectories of the world model (Dreamer);
* ``planet``: CEM planning with the world model (PlaNet).

World models come from the registry :mod:`rl.models` (or a user's ``module:factory``), sized by
the run's settings (:mod:`rl.presets`).
"""

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inference import training

from . import models, presets
from .report import model_report
from .world_model import WorldModel, act, filter_sequence, start_acting

PyTree = Any


class Driver(NamedTuple):
    """What :func:`rl.runner.run` needs of an agent.

    Attributes:
        init: ``key -> state``: the learner state (a pytree, checkpointed whole).
        policy: ``(state, key, explore) -> Policy`` for one episode.
        train: ``(state, key, replay, updates) -> (state, metrics)`` with float metrics.
        report: ``(state, replay, run_dir) -> None``: figures at the end of a run.
        uses_model: whether a world model is trained.
    """

    init: Callable[[jax.Array], PyTree]
    policy: Callable[..., "Policy"]
    train: Callable[..., tuple[PyTree, dict]]
    report: Callable[..., None]
    uses_model: bool


class Policy:
    """Acting for one episode: ``policy(t, obs, mask, first) -> action in [-1, 1]^u``.

    Wraps a jitted ``step(state, carry, key, obs, mask, first, prev_action) -> (action,
    carry)``; ``carry`` is the online belief (or ``None``), ``key`` is ``fold_in(key, t)``.
    ``update_state`` swaps in a newer learner state mid-episode (after a training call);
    ``executed`` replaces the previous action when another one was executed.
    """

    def __init__(self, step, state, carry, key, action_dim: int):
        self._step, self.state, self.carry, self.key = step, state, carry, key
        self.prev = np.zeros(action_dim, np.float32)

    def update_state(self, state) -> None:
        self.state = state

    def executed(self, action) -> None:
        """Tell the policy that ``action`` (not its own) was executed at the last step: the
        next step's belief is predicted through it (e.g. uniform prefill actions)."""
        self.prev = np.asarray(action, np.float32).reshape(self.prev.shape)

    def __call__(self, t, obs, mask, first):
        action, self.carry = self._step(
            self.state, self.carry, jax.random.fold_in(self.key, t),
            jax.tree.map(lambda x: jnp.asarray(x)[None], obs),
            jnp.asarray(np.asarray(mask, bool))[None], bool(first), jnp.asarray(self.prev)[None],
        )  # fmt: skip
        self.prev = np.asarray(action[0], np.float32)
        return np.asarray(self.prev, np.float64)


def _no_report(state, replay, run_dir):
    return None


def _floats(metrics: Mapping) -> dict:
    return {k: float(np.mean(np.asarray(v))) for k, v in metrics.items()}


def _jit_by_explore(step):
    """``{explore: jitted step}``: ``first`` (argument 5) static, one compile per value."""
    return {e: jax.jit(lambda *a, e=e: step(*a, e), static_argnums=5) for e in (True, False)}


# ----------------------------------------------------------------------------- random
def random_driver(action_dim: int) -> Driver:
    def step(state, carry, key, obs, mask, first, prev):
        return jax.random.uniform(key, (1, action_dim), minval=-1.0, maxval=1.0), carry

    jstep = jax.jit(step, static_argnums=5)
    return Driver(
        init=lambda key: {"unused": jnp.zeros(())},
        policy=lambda state, key, explore: Policy(jstep, state, None, key, action_dim),
        train=lambda state, key, replay, updates: (state, {}),
        report=_no_report,
        uses_model=False,
    )


# ----------------------------------------------------------------------------- SAC (states)
def sac_config(settings: dict):
    """The run's :class:`rl.agents.sac.SACConfig`: the preset's ``sac`` entry with
    ``sac_layers`` hidden layers of ``hidden`` units (:mod:`rl.presets`)."""
    return settings["sac"]._replace(hidden=(int(settings["hidden"]),) * int(settings["sac_layers"]))


def sac_driver(settings: dict, obs_dim: int, action_dim: int) -> Driver:
    from .agents.sac import sac

    batch = int(settings["batch_size"])
    agent = sac(obs_dim, action_dim, config=sac_config(settings))

    def step(state, carry, key, obs, mask, first, prev, explore):
        return agent.act(state, key, obs, deterministic=not explore), carry

    jsteps = _jit_by_explore(step)
    update_many = jax.jit(agent.update_many)

    def train(state, key, replay, updates):
        tr = replay.sample_transitions(updates * batch, include_ongoing=True)
        data = {"obs": tr.obs, "action": tr.actions, "reward": tr.rewards,
                "next_obs": tr.next_obs, "discount": tr.discounts}  # fmt: skip
        data = {
            k: jnp.asarray(v).reshape(updates, batch, *np.shape(v)[1:]) for k, v in data.items()
        }
        state, metrics = update_many(state, key, data)
        return state, _floats(metrics)

    return Driver(
        init=agent.init,
        policy=lambda state, key, explore: Policy(jsteps[explore], state, None, key, action_dim),
        train=train,
        report=_no_report,
        uses_model=False,
    )


# ----------------------------------------------------------------------------- world models
class ModelState(NamedTuple):
    """Learner state of a model-based driver: the world model's training state and the
    agent's state."""

    model: training.TrainState
    agent: PyTree


def world_model_trainer(wm: WorldModel, settings: dict, example_batch):
    """``init(key) -> TrainState`` and ``train(state, key, replay, updates) -> (state,
    metrics)`` for a world model on replayed windows of ``seq_len`` steps."""
    optimizer = optax.chain(optax.clip_by_global_norm(100.0),
                            optax.adam(float(settings["model_lr"])))  # fmt: skip
    batch, seq_len = int(settings["model_batch"]), int(settings["seq_len"])
    pool = int(settings["model_pool"])  # minibatches of fresh windows per call

    @jax.jit
    def steps(state, data, num):
        return training.train_steps(wm.objective, optimizer, state, data, num,
                                    batch_size=batch, max_steps=512)  # fmt: skip

    def init(key):
        # jitted: run eagerly, the init traces the model op by op (hundreds of small compiles,
        # ~15 s for KalMamba); the example batch is synthetic, so no data check is skipped
        example = example_batch(batch, seq_len)
        return jax.jit(lambda k: training.init_train_state(wm.objective, optimizer, k, example))(
            key
        )

    def train(state, key, replay, updates):
        seqs = replay.sample_sequences(batch * pool, seq_len, include_ongoing=True)
        state, metrics = steps(state, seqs.model_batch(jnp.result_type(float)), updates)
        m = jax.tree.map(lambda v: np.asarray(v)[:updates], metrics)
        if not np.isfinite(m["loss"]).all():
            raise FloatingPointError(f"world-model loss not finite: {m['loss']}")
        return state, {f"model_{k}": float(np.mean(v)) for k, v in m.items()}

    return init, train, seq_len


def model_driver(wm: WorldModel, agent, settings: dict, example_batch) -> Driver:
    """Any :class:`rl.agents.Agent` on world model ``wm``: acting filters online
    (:func:`rl.world_model.act`), a training call trains the world model on replay and then
    the agent on the filtered beliefs of ``agent.sequences(updates)`` replayed windows (the
    model's parameters held fixed)."""
    model_init, model_train, seq_len = world_model_trainer(wm, settings, example_batch)

    def step(state, acting, key, obs, mask, first, prev, explore):
        # first and explore are traced: one compiled step serves every call of a run
        params = wm.objective.constrain(state.model.params)
        acting = acting._replace(prev_action=prev.astype(acting.prev_action.dtype),
                                 first=jnp.reshape(first, (1,)))  # fmt: skip
        return act(wm, agent, params, state.agent, acting, key, obs, mask, explore)

    jstep = jax.jit(step)
    jstart = jax.jit(lambda state: start_acting(wm, agent, wm.objective.constrain(
        state.model.params), 1))  # fmt: skip

    @partial(jax.jit, static_argnums=3)
    def agent_update(state, key, data, updates):
        params = jax.lax.stop_gradient(wm.objective.constrain(state.model.params))
        k_filter, k_update = jax.random.split(key)
        beliefs = filter_sequence(wm, params, k_filter, data["obs"], data["actions"], data["mask"])
        beliefs = jax.lax.stop_gradient(beliefs)
        return agent.update(params, state.agent, k_update, beliefs, data, updates)

    def init(key):
        k1, k2 = jax.random.split(key)
        return ModelState(model_init(k1), agent.init(k2))

    def train(state, key, replay, updates):
        k1, k2 = jax.random.split(key)
        model, metrics = model_train(state.model, k1, replay, updates)
        state = state._replace(model=model)
        if agent.update is None:
            return state, metrics
        seqs = replay.sample_sequences(agent.sequences(updates), seq_len, include_ongoing=True)
        data = seqs.model_batch(jnp.result_type(float))
        data["discounts"] = jnp.asarray(seqs.discounts, jnp.result_type(float))
        agent_state, agent_metrics = agent_update(state, k2, data, updates)
        return state._replace(agent=agent_state), {**metrics, **_floats(agent_metrics)}

    def policy(state, key, explore):
        return Policy(lambda *a: jstep(*a, explore), state, jstart(state), key, wm.action_dim)

    return Driver(init, policy, train, model_report(wm), True)


def _sac_belief(wm, s):
    from .agents.sac import belief_agent

    return belief_agent(wm, sac_config(s), batch_size=int(s["batch_size"]),
                        sequences=int(s["model_batch"]))  # fmt: skip


def _dreamer(wm, s):
    from .agents.dreamer import dreamer

    return dreamer(wm, s["dreamer"], start_batch=int(s["start_batch"]))


def _planet(wm, s):
    from .agents.planet import planet

    return planet(wm, s["planet"])


#: model-based agents: ``name -> (world model, settings) -> rl.agents.Agent``
MODEL_AGENTS = {"sac-belief": _sac_belief, "dreamer": _dreamer, "planet": _planet}
AGENTS = ("random", "sac", *MODEL_AGENTS)
MODELS = tuple(models.MODELS)
PRESETS = tuple(presets.PRESETS)


# ----------------------------------------------------------------------------- factory
def _obs_dims(env):
    shape = env.observation_shape
    if isinstance(shape, Mapping):
        return {k: (int(np.prod(v)) if len(v) == 1 else tuple(v)) for k, v in shape.items()}
    return int(np.prod(shape)) if len(shape) == 1 else tuple(shape)


def make_world_model(cfg, env) -> WorldModel:
    """The world model ``cfg.model`` sized by the run's settings for ``env``'s observations."""
    return models.build(cfg.model, _obs_dims(env), env.action_dim, presets.settings(cfg), cfg.seed)


def example_batch_fn(env):
    """``(B, T) -> batch`` of zeros shaped like replayed windows of ``env``."""
    dtype = jnp.result_type(float)
    shape = env.observation_shape
    mshape = env.unwrapped.mask_shape

    def obs_zeros(B, T, s):
        return np.zeros((B, T, *s), np.uint8 if len(s) == 3 else dtype)

    def example(B, T):
        obs = (
            {k: obs_zeros(B, T, s) for k, s in shape.items()}
            if isinstance(shape, Mapping)
            else obs_zeros(B, T, shape)
        )
        return {
            "obs": obs,
            "actions": np.zeros((B, T, env.action_dim), dtype),
            "rewards": np.zeros((B, T), dtype),
            "mask": np.ones((B, T, *mshape), bool),
        }

    return example


def make_driver(cfg, env) -> Driver:
    """The driver for ``cfg.agent`` on ``env`` (see the module docstring)."""
    u = env.action_dim
    settings = presets.settings(cfg)
    if cfg.agent not in AGENTS:
        raise ValueError(f"unknown agent {cfg.agent!r}; choose from {AGENTS}")
    if cfg.agent == "random":
        return random_driver(u)
    if cfg.agent == "sac":
        shape = env.observation_shape
        if isinstance(shape, Mapping) or len(shape) != 1:
            raise ValueError("plain SAC takes state vectors: use obs='states' (or sac-belief)")
        return sac_driver(settings, int(shape[0]), u)
    wm = make_world_model(cfg, env)
    return model_driver(wm, MODEL_AGENTS[cfg.agent](wm, settings), settings, example_batch_fn(env))
