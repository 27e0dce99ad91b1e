"""The runner: collect -> train model -> train agent -> evaluate, resumable at any moment.

One run is one :class:`RunConfig` and one directory::

    run_dir/config.json      the configuration (a resumed run must match it)
    run_dir/metrics.jsonl    one JSON record per episode, training call and evaluation
    run_dir/checkpoints/     model, agent and optimiser states, replay, RNG, counters
    run_dir/returns.png      training and evaluation returns against a random policy
    run_dir/summary.json     final evaluation return next to the random policy's

Determinism and resuming. Checkpoints are written at episode boundaries (every
``checkpoint_every`` agent steps, rounded up to the end of an episode) and hold everything the
loop reads: the driver state (world model, agent, optimiser states), the replay with its
generator, the counters and the evaluation history. Every other source of randomness is a pure
function of the run seed and a counter: episode ``i`` runs in an environment seeded by
``(seed, i)``, action ``t`` uses ``fold_in(key, t)`` and training call ``j`` ``fold_in(key', j)``.
So a run killed at any moment (SIGKILL included) and resumed with ``resume=True`` repeats the
episodes after its last checkpoint exactly as the uninterrupted run plays them, and reaches
the same step count with no replay lost.

Time units: ``steps`` count agent steps (one action, repeated ``action_repeat`` times in the
simulator); ``env_steps = steps * action_repeat`` is what the papers report.
"""

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, envs
from .drivers import Driver, make_driver
from .replay import Replay


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run: what to train, on which task, for how long.

    The defaults are the main job: SAC on the filtered belief of a VRKN world model on
    cartpole-swingup from noisy states (observation and action noise N(0, 0.3), the KalMamba
    setting), 100k environment steps with the CPU preset (minutes on 2 CPU cores).

    Attributes:
        agent: ``"sac"`` (raw observations), ``"sac-belief"`` (SAC on a world model's filtered
            belief mean), ``"dreamer"``, ``"planet"`` or ``"random"``.
        model: world model for model-based agents: ``"rssm"``, ``"vrkn"``, ``"kalmamba"``.
        task: dm_control task, e.g. ``"cartpole-swingup"``.
        obs: ``"states"``, ``"pixels"`` or ``"both"``.
        image_size: height and width of rendered images (a multiple of 16, at least 48 for the
            conv encoder; the papers: 64).
        variant: environment variant (:data:`rl.envs.VARIANTS` name) or ``None``.
        preset: ``"cpu"`` or ``"gpu"``: network sizes, batch sizes, planner sizes.
        seed: everything random in the run derives from it.
        env_steps: simulator steps of training (the papers' unit).
        prefill_steps: agent steps of a uniform random policy before any training.
        action_repeat: ``None`` for the task default.
        train_every: agent steps between training calls.
        updates: agent (and world-model) updates per training call.
        eval_every: agent steps between evaluations (at episode ends).
        eval_episodes: episodes per evaluation (deterministic policy, separate seeds).
        checkpoint_every: agent steps between checkpoints (at episode ends).
        replay_capacity: rows kept in replay.
        overrides: extra driver settings (``{"hidden": 64, ...}``), see :mod:`rl.drivers`.
    """

    agent: str = "sac-belief"
    model: str = "vrkn"
    task: str = "cartpole-swingup"
    obs: str = "states"
    image_size: int = 64
    variant: str | None = "noisy"
    preset: str = "cpu"
    seed: int = 0
    env_steps: int = 100_000
    prefill_steps: int = 1_000
    action_repeat: int | None = None
    train_every: int = 50
    updates: int = 50
    eval_every: int = 5_000
    eval_episodes: int = 5
    checkpoint_every: int = 5_000
    replay_capacity: int = 1_000_000
    overrides: tuple = ()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
        return cls(**d)


#: Drivers built in this process (at most a few), by their configuration without the fields
#: that only the loop reads.
_DRIVERS: dict = {}
_LOOP_FIELDS = ("env_steps", "prefill_steps", "train_every", "updates", "eval_every",
                "eval_episodes", "checkpoint_every", "replay_capacity")  # fmt: skip


def _driver(cfg: RunConfig, env) -> Driver:
    """``make_driver(cfg, env)``, reused by later runs in this process whose configurations
    differ at most in :data:`_LOOP_FIELDS`: a driver is pure functions, and reusing it keeps
    their compiled code (a resumed run does not compile again)."""
    key = dataclasses.replace(cfg, **{f: getattr(RunConfig, f) for f in _LOOP_FIELDS})
    try:
        hash(key)
    except TypeError:  # an unhashable override value: build afresh
        return make_driver(cfg, env)
    if key not in _DRIVERS:
        if len(_DRIVERS) >= 4:
            _DRIVERS.pop(next(iter(_DRIVERS)))
        _DRIVERS[key] = make_driver(cfg, env)
    return _DRIVERS[key]


def _env(cfg: RunConfig, seed: int):
    return envs.make(
        cfg.task,
        obs=cfg.obs,
        variant=cfg.variant,
        seed=seed,
        action_repeat=cfg.action_repeat,
        size=cfg.image_size,
    )


def _episode_seed(cfg: RunConfig, episode: int, evaluation: bool = False) -> int:
    base = 1_000_003 * (cfg.seed + 1) + (500_000 if evaluation else 0)
    return int((base + episode) % (2**31 - 1))


def _scale(action: np.ndarray, env) -> np.ndarray:
    """``[-1, 1]`` (what agents emit) to the action spec's ``[low, high]``."""
    lo, hi = env.action_low, env.action_high
    return lo + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (hi - lo)


def play_episode(env, policy, *, replay: Replay | None = None, on_step=None) -> float:
    """Play one episode of ``policy(t, obs, mask, first) -> action in [-1, 1]``; store it in
    ``replay`` (rows as :mod:`rl.replay` documents) and return the undiscounted return."""
    ts = env.reset()
    total, t = 0.0, 0
    while not ts.done:
        a = np.asarray(policy(t, ts.obs, ts.mask, t == 0), np.float64)
        nxt = env.step(_scale(a, env))
        if replay is not None:
            replay.add(ts.obs, a, nxt.reward, ts.mask, ts.info["discount"])
        total += nxt.reward
        ts, t = nxt, t + 1
        if on_step is not None:
            on_step(t, total)
    if replay is not None:
        replay.add(ts.obs, np.zeros(env.action_dim), 0.0, ts.mask, ts.info["discount"], last=True)
    return total


def random_policy(action_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return lambda t, obs, mask, first: rng.uniform(-1.0, 1.0, action_dim)


def evaluate(cfg: RunConfig, driver: Driver | None, state, index: int) -> float:
    """Mean return of ``cfg.eval_episodes`` episodes of the deterministic policy (``driver is
    None``: the uniform random policy), on evaluation seeds ``index, index + 1, ...``."""
    returns = []
    for i in range(cfg.eval_episodes):
        env = _env(cfg, _episode_seed(cfg, index + i, evaluation=True))
        if driver is None:
            policy = random_policy(env.action_dim, _episode_seed(cfg, index + i, True))
        else:
            policy = driver.policy(state, jax.random.key(_episode_seed(cfg, index + i, True)),
                                   explore=False)  # fmt: skip
        returns.append(play_episode(env, policy))
    return float(np.mean(returns))


class _Log:
    def __init__(self, run_dir: Path, up_to_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if up_to_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= up_to_step:
                    kept.append(line)
        elif self.path.exists():
            self.path.unlink()
        self.path.write_text("".join(line + "\n" for line in kept))
        self.records = [json.loads(line) for line in kept]

    def write(self, record: dict) -> None:
        record = {k: (float(v) if isinstance(v, np.floating | jax.Array) else v)
                  for k, v in record.items()}  # fmt: skip
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def run(
    cfg: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_episodes: int | None = None,
) -> dict:
    """Run ``cfg`` in ``run_dir`` (module docstring); returns the summary.

    Args:
        cfg: the configuration.
        run_dir: the run's directory (created).
        resume: continue from the latest checkpoint in ``run_dir`` (its config must equal
            ``cfg``); without a checkpoint the run starts afresh.
        progress: show a progress bar with the latest returns.
        stop_after_episodes: stop (after checkpointing) once this many episodes are done in
            total: an interruption on purpose, for tests and for running in slices.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = run_dir / "checkpoints"
    cfg_path = run_dir / "config.json"
    if resume and cfg_path.exists():
        stored = RunConfig.from_json(json.loads(cfg_path.read_text()))
        if stored != cfg:
            raise ValueError(f"resume: {cfg_path} holds a different configuration: {stored}")
    elif checkpoint.latest(ckpt_root) is not None:
        raise FileExistsError(f"{run_dir} holds a run; pass resume=True or use a new run_dir")
    cfg_path.write_text(json.dumps(cfg.to_json(), indent=1))

    probe = _env(cfg, _episode_seed(cfg, 0))
    repeat = probe.unwrapped.action_repeat
    total_steps = math.ceil(cfg.env_steps / repeat)
    driver = _driver(cfg, probe)
    key = jax.random.key(cfg.seed)
    act_key, train_key, init_key = jax.random.split(key, 3)
    state = driver.init(init_key)
    replay = Replay(cfg.replay_capacity, seed=cfg.seed)
    meta = {
        "steps": 0, "episodes": 0, "train_calls": 0, "next_eval": cfg.eval_every,
        "next_checkpoint": cfg.checkpoint_every, "evals": [], "random_return": None,
    }  # fmt: skip
    path = checkpoint.latest(ckpt_root) if resume else None
    if path is not None:
        trees, stored = checkpoint.restore(path, {"state": state})
        state = trees["state"]
        replay = Replay.load(path / "replay.npz")
        meta = {k: stored[k] for k in meta}
    log = _Log(run_dir, meta["steps"] if path is not None else None)
    if meta["random_return"] is None:
        meta["random_return"] = evaluate(cfg, None, None, 0)
        log.write({"step": 0, "kind": "random", "eval_return": meta["random_return"]})

    bar = tqdm(total=total_steps, initial=meta["steps"], disable=not progress, unit="step",
               desc=f"{cfg.agent}/{cfg.task}")  # fmt: skip
    start = time.time()

    def save():
        files = {"replay.npz": replay.save}  # inside the checkpoint before it is complete
        checkpoint.save(ckpt_root, meta["steps"], {"state": state}, meta, files=files)

    while meta["steps"] < total_steps:
        episode = meta["episodes"]
        env = _env(cfg, _episode_seed(cfg, episode))
        explore_policy = driver.policy(state, jax.random.fold_in(act_key, episode), explore=True)
        rand = random_policy(env.action_dim, _episode_seed(cfg, episode))
        steps0 = meta["steps"]
        length = env.unwrapped.episode_length
        # an episode that ends inside the prefill never acts on the agent's belief: skip it
        # (PlaNet would plan at every step for nothing); otherwise keep the belief current
        track = length is None or steps0 + length > cfg.prefill_steps

        def policy(t, obs, mask, first, explore_policy=explore_policy, rand=rand, steps0=steps0,
                   track=track):  # fmt: skip
            if steps0 + t < cfg.prefill_steps:
                action = rand(t, obs, mask, first)
                if track:  # filter with the action actually taken
                    explore_policy(t, obs, mask, first)
                    explore_policy.executed(action)
                return action
            return explore_policy(t, obs, mask, first)

        def on_step(t, ret, steps0=steps0, explore_policy=explore_policy):
            nonlocal state
            step = steps0 + t
            bar.update(1)
            if step >= cfg.prefill_steps and step % cfg.train_every == 0:
                k = jax.random.fold_in(train_key, meta["train_calls"])
                state, metrics = driver.train(state, k, replay, cfg.updates)
                meta["train_calls"] += 1
                explore_policy.update_state(state)
                log.write({"step": step, "kind": "train", **metrics})

        ret = play_episode(env, policy, replay=replay, on_step=on_step)
        meta["steps"] += env.unwrapped.last_episode.length
        meta["episodes"] += 1
        log.write({"step": meta["steps"], "kind": "episode", "episode": episode,
                   "return": ret, "env_steps": meta["steps"] * repeat,
                   "seconds": time.time() - start})  # fmt: skip
        bar.set_postfix(ret=f"{ret:.0f}", eval=_last_eval(meta))
        done = meta["steps"] >= total_steps
        if meta["steps"] >= meta["next_eval"] or done:
            value = evaluate(cfg, driver, state, 1000 * (len(meta["evals"]) + 1))
            meta["evals"].append([meta["steps"], value])
            meta["next_eval"] = meta["steps"] + cfg.eval_every
            log.write({"step": meta["steps"], "kind": "eval", "eval_return": value,
                       "env_steps": meta["steps"] * repeat})  # fmt: skip
            bar.set_postfix(ret=f"{ret:.0f}", eval=_last_eval(meta))
        stop = stop_after_episodes is not None and meta["episodes"] >= stop_after_episodes
        if meta["steps"] >= meta["next_checkpoint"] or done or stop:
            meta["next_checkpoint"] = meta["steps"] + cfg.checkpoint_every
            save()
        if stop:
            break
    bar.close()
    summary = {
        "agent": cfg.agent, "model": cfg.model if driver.uses_model else None,
        "task": cfg.task, "obs": cfg.obs, "variant": cfg.variant,
        "steps": meta["steps"], "env_steps": meta["steps"] * repeat,
        "final_eval_return": meta["evals"][-1][1] if meta["evals"] else None,
        "random_return": meta["random_return"],
        "evals": meta["evals"], "finished": meta["steps"] >= total_steps,
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_returns(log.records, run_dir / "returns.png", repeat)
    if summary["finished"]:
        driver.report(state, replay, run_dir)
    return summary


def _last_eval(meta) -> str:
    return f"{meta['evals'][-1][1]:.0f}" if meta["evals"] else "-"


def plot_returns(records: list[dict], path: Path, action_repeat: int) -> None:
    """Training-episode and evaluation returns against environment steps, with the random
    policy's evaluation return as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [(r["env_steps"], r["return"]) for r in records if r.get("kind") == "episode"]
    ev = [(r["env_steps"], r["eval_return"]) for r in records if r.get("kind") == "eval"]
    rnd = [r["eval_return"] for r in records if r.get("kind") == "random"]
    if ep:
        ax.plot(*zip(*ep, strict=True), ".", alpha=0.4, label="training episodes")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="evaluation")
    if rnd:
        ax.axhline(rnd[0], color="grey", ls="--", label="random policy")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
