"""The runner: collect -> train model -> train agent -> evaluate, resumable at any moment.

One run is one :class:`RunConfig` and one directory::

    run_dir/config.json      the configuration (a resumed run must match it)
    run_dir/metrics.jsonl    one JSON record per episode, training call and evaluation
    run_dir/tensorboard/     the same metrics as TensorBoard event files (rl.run_log)
    run_dir/videos/          a GIF of the first episode of every evaluation (rl.video)
    run_dir/checkpoints/     model, agent and optimiser states, replay, RNG, counters
    run_dir/returns.png      training and evaluation returns against a random policy
    run_dir/summary.json     final evaluation return next to the random policy's

A configuration is checked (:func:`rl.config.check`) and the run directory too
(:func:`check_run_dir`) before anything is written.

Determinism and resuming. Checkpoints are written at episode boundaries (every
``checkpoint_every`` agent steps, rounded up to the end of an episode) and hold everything the
loop reads: the driver state (world model, agent, optimiser states), the replay with its
generator, the counters and the evaluation history. Every other source of randomness is a pure
function of the run seed and a counter: episode ``i`` runs in an environment seeded by
``(seed, i)``, action ``t`` uses ``fold_in(key, t)`` and training call ``j`` ``fold_in(key', j)``.
So a run killed at any moment (SIGKILL included) and resumed with ``resume=True`` repeats the
episodes after its last checkpoint exactly as the uninterrupted run plays them, and reaches
the same step count with no replay lost. Resuming takes the newest checkpoint that verifies
(:mod:`inference.training.checkpoint`): a damaged, incomplete or missing newest one is skipped
with a logged reason, and with none intact the run stops before changing anything. A resumed
run may raise ``env_steps``: a finished run then goes on.

Time units: ``steps`` count agent steps (one action, repeated ``action_repeat`` times in the
simulator); ``env_steps = steps * action_repeat`` is what the papers report.
"""

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, envs, video
from .checkpoint import CheckpointError
from .config import ConfigError, RunConfig, check, describe, resume_differences
from .drivers import Driver, make_driver
from .replay import Replay
from .run_log import RunLog

__all__ = ["CheckpointError", "ConfigError", "RunConfig", "check_run_dir", "evaluate",
           "play_episode", "run", "stored_config", "use_compilation_cache"]  # fmt: skip

log = logging.getLogger(__name__)
#: names inside a run directory
CONFIG, CHECKPOINTS, REPLAY, VIDEOS = "config.json", "checkpoints", "replay.npz", "videos"


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
    ``replay`` (rows as :mod:`rl.replay` documents, with the per-pixel masks of an occluded
    variant, ``info["pixel_mask"]``, which the world models' image likelihoods then use) and
    return the undiscounted return."""
    ts = env.reset()
    total, t = 0.0, 0
    while not ts.done:
        a = np.asarray(policy(t, ts.obs, ts.mask, t == 0), np.float64)
        nxt = env.step(_scale(a, env))
        if replay is not None:
            replay.add(ts.obs, a, nxt.reward, ts.mask, ts.info["discount"],
                       pixel_mask=ts.info.get("pixel_mask"))  # fmt: skip
        total += nxt.reward
        ts, t = nxt, t + 1
        if on_step is not None:
            on_step(t, total)
    if replay is not None:
        replay.add(ts.obs, np.zeros(env.action_dim), 0.0, ts.mask, ts.info["discount"],
                   last=True, pixel_mask=ts.info.get("pixel_mask"))  # fmt: skip
    return total


def random_policy(action_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return lambda t, obs, mask, first: rng.uniform(-1.0, 1.0, action_dim)


def evaluate(
    cfg: RunConfig, driver: Driver | None, state, index: int, *, recorder=None, step: int = 0
) -> float:
    """Mean return of ``cfg.eval_episodes`` episodes of the deterministic policy (``driver is
    None``: the uniform random policy), on evaluation seeds ``index, index + 1, ...``; the
    first episode is played by ``recorder(env, policy, state, step)`` when given (a video)."""
    returns = []
    for i in range(cfg.eval_episodes):
        env = _env(cfg, _episode_seed(cfg, index + i, evaluation=True))
        if driver is None:
            policy = random_policy(env.action_dim, _episode_seed(cfg, index + i, True))
        else:
            policy = driver.policy(state, jax.random.key(_episode_seed(cfg, index + i, True)),
                                   explore=False)  # fmt: skip
        if i == 0 and recorder is not None:
            returns.append(recorder(env, policy, state, step))
        else:
            returns.append(play_episode(env, policy))
    return float(np.mean(returns))


def default_cache_dir() -> Path:
    """Where the runner keeps JAX's compiled programs: ``$PSSM_CACHE_DIR/jax``, else
    ``$XDG_CACHE_HOME/pssm/jax``, else ``~/.cache/pssm/jax``."""
    if os.environ.get("PSSM_CACHE_DIR"):
        return Path(os.environ["PSSM_CACHE_DIR"]) / "jax"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pssm" / "jax"


def use_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Turn on JAX's persistent compilation cache (for this process) unless the user has
    chosen a directory (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``); returns the directory.

    Programs that took at least 0.2 s to compile are stored, so a resumed or repeated run
    loads them instead of compiling. Measured (``pssm run --env-steps 9000 --eval-episodes 1
    --no-video``: the default job, SAC on a VRKN belief, to its first training calls; 2 CPU
    cores shared with other work, twice): 98 s and 117 s with an empty cache, 55 s and 69 s
    with the 2.4 MB the first run left in it, i.e. about 45 s of compilation saved.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = str(path or default_cache_dir())
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def check_run_dir(cfg: RunConfig, run_dir: str | os.PathLike, resume: bool) -> None:
    """Raise :class:`~rl.config.ConfigError` (field ``run_dir`` or ``resume``) unless ``cfg``
    can start in ``run_dir`` (``resume=False``: no checkpoint there) or continue the run there
    (``resume=True``: its ``config.json`` differs from ``cfg`` at most by a larger
    ``env_steps``). Reads only."""
    run_dir = Path(run_dir)
    if not resume:
        root = run_dir / CHECKPOINTS
        if checkpoint.steps(root) or checkpoint.others(root):
            raise ConfigError("run_dir", f"{run_dir} holds a run: resume it or use a new "
                              "run directory")  # fmt: skip
        return
    stored = stored_config(run_dir)
    if differences := resume_differences(stored, cfg):
        raise ConfigError("resume", f"{run_dir / CONFIG} holds a different configuration: "
                          + describe(differences))  # fmt: skip


def stored_config(run_dir: str | os.PathLike) -> RunConfig:
    """The configuration of the run in ``run_dir``; :class:`~rl.config.ConfigError` (field
    ``run_dir``) when there is none or it does not parse."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else f"holds no {CONFIG}"
        raise ConfigError("run_dir", f"{run_dir} {what}: there is no run to resume")
    try:
        return RunConfig.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError("run_dir", f"{path} is unreadable ({e})") from None


def run(
    cfg: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_episodes: int | None = None,
    video: bool = True,
    tensorboard: bool = True,
    compilation_cache: bool = True,
) -> dict:
    """Run ``cfg`` in ``run_dir`` (module docstring); returns the summary.

    Args:
        cfg: the configuration.
        run_dir: the run's directory (created).
        resume: continue from the newest intact checkpoint in ``run_dir`` (its config must
            equal ``cfg`` but for a larger ``env_steps``, which extends the run); damaged newer
            checkpoints are skipped with a logged reason; without any checkpoint the run starts
            from step 0.
        progress: show a progress bar with the latest returns.
        stop_after_episodes: stop (after checkpointing) once this many episodes are done in
            total: an interruption on purpose, for tests and for running in slices.
        video: write a video of the first episode of every evaluation (:mod:`rl.video`).
        tensorboard: write TensorBoard event files of every metric (:mod:`rl.run_log`).
        compilation_cache: turn on JAX's persistent compilation cache
            (:func:`use_compilation_cache`).

    Nothing is written to ``run_dir`` before the configuration, the run directory and (when
    resuming) a checkpoint have passed their checks.

    Raises:
        ConfigError: ``cfg`` is invalid, or does not fit ``run_dir`` (:func:`check_run_dir`).
        CheckpointError: resuming, the run has checkpoints but none is intact.
    """
    check(cfg)
    run_dir = Path(run_dir)
    check_run_dir(cfg, run_dir, resume)
    if compilation_cache:
        use_compilation_cache()
    ckpt_root = run_dir / CHECKPOINTS
    probe = _env(cfg, _episode_seed(cfg, 0))
    driver = _driver(cfg, probe)
    key = jax.random.key(cfg.seed)
    act_key, train_key, init_key = jax.random.split(key, 3)
    state = driver.init(init_key)
    replay = Replay(cfg.replay_capacity, seed=cfg.seed)
    meta = {
        "steps": 0, "episodes": 0, "train_calls": 0, "next_eval": cfg.eval_every,
        "next_checkpoint": cfg.checkpoint_every, "evals": [], "random_return": None,
    }  # fmt: skip

    def load(path):
        trees, stored = checkpoint.restore(path, {"state": state})
        try:
            loaded = Replay.load(path / REPLAY)
        except Exception as e:  # verified yet unreadable: not a replay this code wrote
            raise CheckpointError(f"{path / REPLAY} is unreadable ({e})") from None
        return trees["state"], loaded, {k: stored[k] for k in meta}

    found = checkpoint.restore_newest(ckpt_root, load) if resume else None
    if found is not None:
        _, (state, replay, meta) = found
    elif resume:
        log.warning("%s holds no checkpoint: the run starts from step 0", run_dir)
    # everything is checked: from here on the run directory is written
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_temporary(ckpt_root)
    (run_dir / CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
    repeat = probe.unwrapped.action_repeat
    runlog = RunLog(run_dir, repeat, meta["steps"] if found else None, tensorboard)
    try:
        return _loop(cfg, run_dir, probe, driver, state, replay, meta, runlog,
                     keys=(act_key, train_key), progress=progress, video=video,
                     stop_after_episodes=stop_after_episodes)  # fmt: skip
    finally:
        runlog.close()
        checkpoint.remove_temporary(ckpt_root)


def _loop(cfg, run_dir, probe, driver, state, replay, meta, runlog, *, keys, progress, video,
          stop_after_episodes) -> dict:  # fmt: skip
    """The run from ``meta``'s counters on (module docstring); returns the summary."""
    act_key, train_key = keys
    repeat = probe.unwrapped.action_repeat
    total_steps = math.ceil(cfg.env_steps / repeat)
    if meta["random_return"] is None:
        meta["random_return"] = evaluate(cfg, None, None, 0)
        runlog.write({"step": 0, "kind": "random", "eval_return": meta["random_return"]})
    recorder = _Recorder(cfg, probe, run_dir, runlog) if video else None

    bar = tqdm(total=total_steps, initial=meta["steps"], disable=not progress, unit="step",
               desc=f"{cfg.agent}/{cfg.task}")  # fmt: skip
    start = time.time()

    def save():
        files = {REPLAY: replay.save}  # inside the checkpoint before it is complete
        checkpoint.save(run_dir / CHECKPOINTS, meta["steps"], {"state": state}, meta, files=files)
        runlog.flush()

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
                runlog.write({"step": step, "kind": "train", **metrics})

        ret = play_episode(env, policy, replay=replay, on_step=on_step)
        meta["steps"] += env.unwrapped.last_episode.length
        meta["episodes"] += 1
        runlog.write({"step": meta["steps"], "kind": "episode", "episode": episode,
                      "return": ret, "env_steps": meta["steps"] * repeat,
                      "seconds": time.time() - start})  # fmt: skip
        bar.set_postfix(ret=f"{ret:.0f}", eval=_last_eval(meta))
        done = meta["steps"] >= total_steps
        if meta["steps"] >= meta["next_eval"] or done:
            index = 1000 * (len(meta["evals"]) + 1)
            value = evaluate(cfg, driver, state, index, recorder=recorder, step=meta["steps"])
            meta["evals"].append([meta["steps"], value])
            meta["next_eval"] = meta["steps"] + cfg.eval_every
            runlog.write({"step": meta["steps"], "kind": "eval", "eval_return": value,
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
    plot_returns(runlog.records, run_dir / "returns.png", repeat)
    if summary["finished"]:
        driver.report(state, replay, run_dir)
    return summary


class _Recorder:
    """Plays an evaluation episode into ``run_dir/videos/eval-<env steps>.gif``; the first
    reason for not writing one is logged once (:mod:`rl.video`)."""

    def __init__(self, cfg: RunConfig, env, run_dir: Path, runlog: RunLog):
        self.cfg, self.env, self.run_dir, self.runlog = cfg, env, run_dir, runlog
        self.noted = any(r.get("kind") == "note" for r in runlog.records)
        self._panels = None

    def __call__(self, env, policy, state, step: int) -> float:
        if self._panels is None:  # the world model's decoder, built at the first evaluation
            self._panels = (video.model_panels(self.cfg, self.env),)
        ret, frames, note = video.record_episode(env, policy, play_episode, state=state,
                                                 panels=self._panels[0])  # fmt: skip
        repeat = env.unwrapped.action_repeat
        if frames is not None:
            path = self.run_dir / VIDEOS / f"eval-{step * repeat:09d}.gif"
            video.write_video(path, frames, env.unwrapped.control_timestep)
        elif not self.noted:
            log.warning("%s", note)
            self.runlog.write({"step": step, "kind": "note", "note": note})
            self.noted = True
        return ret


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
