"""Drivers: one agent (with its world model, if any) as the runner drives it.

A :class:`Driver` bundles the pieces the loop in :mod:`rl.runner` calls: ``init`` builds the
whole learner state (a pytree: world-model :class:`inference.training.TrainState`, agent state),
``policy`` returns an acting :class:`Policy` for one episode (it keeps the episode's online
filtered belief), ``train`` runs one training call on replay, ``report`` writes figures at the
end. The agents themselves are pure functions (:mod:`rl.agents`); drivers only jit, batch and
feed them.

Agents:

* ``random``: uniform actions (the baseline every run also evaluates);
* ``sac``: SAC on raw state observations;
* ``sac-belief``: SAC on the mean of a world model's filtered belief, world model trained
  alongside on replayed sequences, agent gradients stopped at the model (KalMamba's setting);
* ``dreamer``: actor-critic on imagined trajectories of the world model (Dreamer);
* ``planet``: CEM planning with the world model (PlaNet).
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inference import training

from .world_model import WorldModel, filter_sequence

PyTree = Any
AGENTS = ("random", "sac", "sac-belief", "dreamer", "planet")
MODELS = ("rssm", "vrkn", "kalmamba")
PRESETS = ("cpu", "gpu")  # network, batch and planner sizes (read where each is built)


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


def _override(cfg, name, default):
    return dict(cfg.overrides).get(name, default)


#: Driver settings ``RunConfig.overrides`` may hold; ``planet.<field>`` and ``dreamer.<field>``
#: set fields of :class:`rl.agents.planet.PlanetConfig` / :class:`rl.agents.dreamer.DreamerConfig`.
OVERRIDES = ("batch_size", "conv_depth", "d_model", "d_state", "deter", "features", "hidden",
             "latent", "mc_dropout", "model_batch", "model_hidden", "model_lr", "model_pool",
             "seq_len", "start_batch", "stoch")  # fmt: skip


def check_overrides(overrides) -> None:
    """``ValueError`` naming any override that no driver reads, ``planet.<field>`` and
    ``dreamer.<field>`` checked against the agents' configs (a typo would be ignored)."""
    from .agents.dreamer import DreamerConfig
    from .agents.planet import PlanetConfig

    agent_fields = {"planet": PlanetConfig._fields, "dreamer": DreamerConfig._fields}
    for name, _ in overrides:
        prefix, _, field = name.partition(".")
        if name not in OVERRIDES and field not in agent_fields.get(prefix, ()):
            raise ValueError(f"unknown override {name!r}; known: {OVERRIDES} and planet.<field>, "
                             "dreamer.<field>")  # fmt: skip


def agent_config(cfg, base, prefix: str):
    """``base`` (a config NamedTuple) with ``cfg``'s ``prefix.<field>`` overrides applied; a
    scalar given for a sequence field is repeated to its default length (``dreamer.actor_hidden
    =64`` -> ``(64, 64)``)."""
    fields = {}
    for name, value in cfg.overrides:
        if not name.startswith(prefix + "."):
            continue
        field = name[len(prefix) + 1 :]
        if field not in base._fields:
            raise ValueError(f"unknown override {name!r}; {prefix} fields: {base._fields}")
        default = getattr(base, field)
        if isinstance(default, tuple | list):
            value = tuple(value) if isinstance(value, tuple | list) else (value,) * len(default)
        fields[field] = value
    return base._replace(**fields)


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
def sac_driver(cfg, obs_dim: int, action_dim: int) -> Driver:
    from .agents.sac import SACConfig, sac

    hidden = int(_override(cfg, "hidden", 256))
    batch = int(_override(cfg, "batch_size", 256))
    agent = sac(obs_dim, action_dim, config=SACConfig(hidden=(hidden, hidden)))

    def step(state, carry, key, obs, mask, first, prev, explore):
        return agent.act(state, key, obs, deterministic=not explore), carry

    jsteps = {e: jax.jit(lambda *a, e=e: step(*a, e), static_argnums=5) for e in (True, False)}
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


def _model_batch(seqs, dtype) -> dict:
    batch = seqs.model_batch()
    batch["actions"] = batch["actions"].astype(dtype)
    batch["rewards"] = batch["rewards"].astype(dtype)
    if not isinstance(batch["obs"], Mapping):
        o = batch["obs"]
        batch["obs"] = o if o.dtype == np.uint8 else o.astype(dtype)
    return batch


def online_filter_step(wm: WorldModel):
    """``(params, belief, key, obs, mask, first, prev_action) -> belief``: one step of the
    online filter (predict through the previous action unless ``first``, then observe)."""

    def step(params, belief, key, obs, mask, first, prev):
        k1, k2 = jax.random.split(key)
        if first:
            belief = wm.init_belief(params, jax.tree.leaves(obs)[0].shape[0])
        else:
            belief = wm.imagine(params, k1, belief, prev.astype(jnp.result_type(float)))
        return wm.observe(params, k2, belief, obs, mask)

    return step


def world_model_trainer(wm: WorldModel, cfg, example_batch):
    """``init(key) -> TrainState`` and ``train(state, key, replay, updates) -> (state,
    metrics)`` for a world model on replayed windows of ``seq_len`` steps."""
    lr = float(_override(cfg, "model_lr", 6e-4 if cfg.agent == "dreamer" else 1e-3))
    optimizer = optax.chain(optax.clip_by_global_norm(100.0), optax.adam(lr))
    batch = int(_override(cfg, "model_batch", 50 if cfg.preset == "gpu" else 16))
    seq_len = int(_override(cfg, "seq_len", 50 if cfg.preset == "gpu" else 32))
    pool = int(_override(cfg, "model_pool", 4))  # minibatches of fresh windows per call

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
        state, metrics = steps(state, _model_batch(seqs, jnp.result_type(float)), updates)
        m = jax.tree.map(lambda v: np.asarray(v)[:updates], metrics)
        if not np.isfinite(m["loss"]).all():
            raise FloatingPointError(f"world-model loss not finite: {m['loss']}")
        return state, {f"model_{k}": float(np.mean(v)) for k, v in m.items()}

    return init, train, batch, seq_len


def model_report(wm: WorldModel, context_fraction: float = 0.5):
    """``report(state, replay, run_dir)``: reconstructions (decoded filtered beliefs) and
    open-loop predictions (decoded ``imagine`` rollouts under the recorded actions from the
    belief after the first half of a replayed episode window) against the truth, as
    ``model_predictions.png`` and ``model_report.json`` (per-step open-loop MSE)."""

    def report(state, replay, run_dir):
        import json as _json
        from pathlib import Path

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from inference.evaluation import world_model_predict

        if wm.decode is None or replay.num_episodes == 0:
            return
        params = wm.objective.constrain(state.model.params)
        length = min(50, min(len(replay.episode(i)["rewards"]) for i in range(replay.num_episodes)))
        batch = _model_batch(replay.sample_sequences(1, length), jnp.result_type(float))
        obs, actions, mask = batch["obs"], jnp.asarray(batch["actions"]), batch["mask"]
        key = jax.random.key(0)
        beliefs = filter_sequence(wm, params, key, obs, actions, mask)
        recon = wm.decode(params, wm.features(params, beliefs))
        c = max(1, int(length * context_fraction))
        start = jax.tree.map(lambda v: v[:, c - 1], beliefs)
        pred = world_model_predict(wm)(params, key, start, actions[:, c - 1 : length - 1])
        if isinstance(obs, Mapping):  # several modalities: report the image, else the first
            name = "image" if "image" in obs else next(iter(obs))
            obs, recon, pred = obs[name], recon[name], pred[name]
        truth = np.asarray(obs, np.float64)
        if truth.ndim == 5:  # images: uint8 truth, decoded means in [-0.5, 0.5]
            from pssm.layers import preprocess_image

            truth = np.asarray(preprocess_image(jnp.asarray(obs)), np.float64)
        recon, pred = np.asarray(recon, np.float64), np.asarray(pred, np.float64)
        mse = ((pred[0] - truth[0, c:]) ** 2).reshape(length - c, -1).mean(-1)
        Path(run_dir, "model_report.json").write_text(_json.dumps({
            "context": c, "open_loop_mse_per_step": mse.tolist(),
            "reconstruction_mse": float(((recon[0] - truth[0]) ** 2).mean()),
        }, indent=1))  # fmt: skip
        path = Path(run_dir, "model_predictions.png")
        if truth.ndim == 5:
            from inference.evaluation import save_image_grid

            step = max(1, length // 12)
            rows = [
                truth[0, ::step] + 0.5,
                recon[0, ::step] + 0.5,
                np.concatenate([np.full_like(truth[0, :c], np.nan), pred[0]])[::step] + 0.5,
            ]
            save_image_grid(path, rows, ["truth", "filtered", "open loop"])  # fmt: skip
            return
        dims = min(4, truth.shape[-1])
        fig, axes = plt.subplots(dims, 1, figsize=(6, 1.6 * dims), squeeze=False)
        t = np.arange(length)
        for i in range(dims):
            ax = axes[i, 0]
            ax.plot(t, truth[0, :, i], "k-", lw=1, label="observed")
            ax.plot(t, recon[0, :, i], "C0--", lw=1, label="filtered, decoded")
            ax.plot(t[c:], pred[0, :, i], "C1-", lw=1, label="open loop")
            ax.axvline(c - 0.5, color="grey", lw=0.5)
        axes[0, 0].legend(fontsize=7, loc="best")
        axes[-1, 0].set_xlabel("agent step")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return report


def sac_belief_driver(cfg, wm: WorldModel, example_batch) -> Driver:
    from .agents.sac import SACConfig, belief_transitions, sac, sample_batches

    hidden = int(_override(cfg, "hidden", 256))
    batch = int(_override(cfg, "batch_size", 256 if cfg.preset == "gpu" else 128))
    agent = sac(wm.feature_size, wm.action_dim, config=SACConfig(hidden=(hidden, hidden)))
    model_init, model_train, model_batch, seq_len = world_model_trainer(wm, cfg, example_batch)
    filt = online_filter_step(wm)

    def step(state, belief, key, obs, mask, first, prev, explore):
        params = wm.objective.constrain(state.model.params)
        k_filter, k_act = jax.random.split(key)
        belief = filt(params, belief, k_filter, obs, mask, first, prev)
        f = jax.lax.stop_gradient(wm.features(params, belief))
        return agent.act(state.agent, k_act, f, deterministic=not explore), belief

    jsteps = {e: jax.jit(lambda *a, e=e: step(*a, e), static_argnums=5) for e in (True, False)}

    @jax.jit
    def agent_update(state, key, data, updates_arr):
        params = jax.lax.stop_gradient(wm.objective.constrain(state.model.params))
        k_filter, k_batch, k_update = jax.random.split(key, 3)
        beliefs = filter_sequence(wm, params, k_filter, data["obs"], data["actions"], data["mask"])
        f = wm.features(params, jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), beliefs))
        f = f.reshape(*data["rewards"].shape, -1)
        d = jnp.concatenate([data["discounts"][:, 1:], jnp.ones_like(data["discounts"][:, :1])], 1)
        tr = belief_transitions(f, data["actions"], data["rewards"], d)
        batches = sample_batches(k_batch, tr, updates_arr.shape[0], batch)
        return agent.update_many(state.agent, k_update, batches)

    def init(key):
        k1, k2 = jax.random.split(key)
        return ModelState(model_init(k1), agent.init(k2))

    def train(state, key, replay, updates):
        k1, k2 = jax.random.split(key)
        model, metrics = model_train(state.model, k1, replay, updates)
        state = state._replace(model=model)
        seqs = replay.sample_sequences(model_batch, seq_len, include_ongoing=True)
        data = _model_batch(seqs, jnp.result_type(float))
        data["discounts"] = jnp.asarray(seqs.discounts, jnp.result_type(float))
        agent_state, agent_metrics = agent_update(state, k2, data, jnp.zeros(updates))
        return state._replace(agent=agent_state), {**metrics, **_floats(agent_metrics)}

    def policy(state, key, explore):
        return Policy(jsteps[explore], state, None, key, wm.action_dim)

    return Driver(init, policy, train, model_report(wm), True)


def _stack(batch: dict, groups: int) -> dict:
    """Leaves ``(groups * B, ...)`` -> ``(groups, B, ...)``."""
    return jax.tree.map(lambda v: jnp.asarray(v).reshape(groups, -1, *np.shape(v)[1:]), batch)


def dreamer_driver(cfg, wm: WorldModel, example_batch) -> Driver:
    from .agents.dreamer import DREAMER_CPU, DreamerConfig, dreamer, flatten_beliefs

    config = agent_config(cfg, DreamerConfig() if cfg.preset == "gpu" else DREAMER_CPU, "dreamer")
    agent = dreamer(wm, config)
    model_init, model_train, model_batch, seq_len = world_model_trainer(wm, cfg, example_batch)

    def step(state, acting, key, obs, mask, first, prev, explore):
        params = wm.objective.constrain(state.model.params)
        if first:
            acting = agent.init_acting(params, 1)
        return agent.act(params, state.agent, acting, key, obs, mask, explore)

    jsteps = {e: jax.jit(lambda *a, e=e: step(*a, e), static_argnums=5) for e in (True, False)}

    @jax.jit
    def agent_updates(state, key, data):
        params = jax.lax.stop_gradient(wm.objective.constrain(state.model.params))

        def one(agent_state, xs):
            k, batch = xs
            k_filter, k_update = jax.random.split(k)
            beliefs = filter_sequence(
                wm, params, k_filter, batch["obs"], batch["actions"], batch["mask"]
            )
            return agent.update(params, agent_state, k_update, flatten_beliefs(beliefs))

        keys = jax.random.split(key, jax.tree.leaves(data)[0].shape[0])
        return jax.lax.scan(one, state.agent, (keys, data))

    def init(key):
        k1, k2 = jax.random.split(key)
        return ModelState(model_init(k1), agent.init(k2))

    def train(state, key, replay, updates):
        k1, k2 = jax.random.split(key)
        model, metrics = model_train(state.model, k1, replay, updates)
        state = state._replace(model=model)
        starts = int(_override(cfg, "start_batch", 8))  # sequences of start beliefs per update
        seqs = replay.sample_sequences(updates * starts, seq_len, include_ongoing=True)
        data = _stack(_model_batch(seqs, jnp.result_type(float)), updates)
        agent_state, agent_metrics = agent_updates(state, k2, data)
        return state._replace(agent=agent_state), {**metrics, **_floats(agent_metrics)}

    def policy(state, key, explore):
        return Policy(jsteps[explore], state, None, key, wm.action_dim)

    return Driver(init, policy, train, model_report(wm), True)


def planet_driver(cfg, wm: WorldModel, example_batch) -> Driver:
    from .agents.planet import PLANET_CPU, PlanetConfig, planet

    agent = planet(wm, agent_config(cfg, PlanetConfig() if cfg.preset == "gpu" else PLANET_CPU,
                                    "planet"))  # fmt: skip
    model_init, model_train, _, _ = world_model_trainer(wm, cfg, example_batch)

    def step(state, planner, key, obs, mask, first, prev, explore):
        params = wm.objective.constrain(state.model.params)
        if first:
            planner = agent.init(params, 1)
        return agent.act(params, planner, key, obs, mask, explore)

    jsteps = {e: jax.jit(lambda *a, e=e: step(*a, e), static_argnums=5) for e in (True, False)}

    def init(key):
        return ModelState(model_init(key), ())

    def train(state, key, replay, updates):
        model, metrics = model_train(state.model, key, replay, updates)
        return state._replace(model=model), metrics

    def policy(state, key, explore):
        return Policy(jsteps[explore], state, None, key, wm.action_dim)

    return Driver(init, policy, train, model_report(wm), True)


# ----------------------------------------------------------------------------- factory
def _obs_dims(env):
    shape = env.observation_shape
    if isinstance(shape, Mapping):
        return {k: (int(np.prod(v)) if len(v) == 1 else tuple(v)) for k, v in shape.items()}
    return int(np.prod(shape)) if len(shape) == 1 else tuple(shape)


def make_world_model(cfg, env) -> WorldModel:
    """The world model ``cfg.model`` sized by ``cfg.preset`` for ``env``'s observations."""
    dims, u = _obs_dims(env), env.action_dim
    gpu = cfg.preset == "gpu"
    if cfg.model == "rssm":
        from .world_models.rssm import rssm_world_model

        stoch, deter, hidden = (30, 200, 200) if gpu else (
            int(_override(cfg, "stoch", 16)), int(_override(cfg, "deter", 64)),
            int(_override(cfg, "model_hidden", 64)),
        )  # fmt: skip
        return rssm_world_model(
            dims, u, stoch=stoch, deter=deter, hidden=hidden, seed=cfg.seed,
            conv_depth=int(_override(cfg, "conv_depth", 32 if gpu else 16)),
        )  # fmt: skip
    latent = int(_override(cfg, "latent", 230 if gpu else 32))
    hidden = int(_override(cfg, "model_hidden", 300 if gpu else 64))
    mcd = bool(_override(cfg, "mc_dropout", True))
    if cfg.model == "vrkn":
        from .world_models.vrkn import vrkn_world_model

        return vrkn_world_model(
            dims, u, latent_dim=latent, hidden=hidden, mlp_hidden=(hidden, hidden),
            mc_dropout=mcd, seed=cfg.seed, features=str(_override(cfg, "features", "mean")),
            conv_depth=int(_override(cfg, "conv_depth", 32 if gpu else 16)),
        )  # fmt: skip
    if cfg.model == "kalmamba":
        from .world_models.kalmamba import kalmamba_world_model

        return kalmamba_world_model(
            dims, u, mc_dropout=mcd, latent_dim=latent, hidden=(hidden, hidden),
            d_model=int(_override(cfg, "d_model", 256 if gpu else 64)),
            d_state=int(_override(cfg, "d_state", 64 if gpu else 16)), seed=cfg.seed,
            conv_depth=int(_override(cfg, "conv_depth", 32 if gpu else 16)),
        )  # fmt: skip
    raise ValueError(f"unknown model {cfg.model!r}; choose from {MODELS}")


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
    check_overrides(cfg.overrides)
    if cfg.agent not in AGENTS:
        raise ValueError(f"unknown agent {cfg.agent!r}; choose from {AGENTS}")
    if cfg.agent == "random":
        return random_driver(u)
    if cfg.agent == "sac":
        shape = env.observation_shape
        if isinstance(shape, Mapping) or len(shape) != 1:
            raise ValueError("plain SAC takes state vectors: use obs='states' (or sac-belief)")
        return sac_driver(cfg, int(shape[0]), u)
    wm = make_world_model(cfg, env)
    builders = {"sac-belief": sac_belief_driver, "dreamer": dreamer_driver,
                "planet": planet_driver}  # fmt: skip
    return builders[cfg.agent](cfg, wm, example_batch_fn(env))
