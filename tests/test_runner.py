"""The runner: a run interrupted and resumed equals the uninterrupted run, step for step."""

import json

import jax
import numpy as np
import pytest

from rl import checkpoint, runner
from rl.replay import Replay
from rl.runner import ConfigError, RunConfig

TINY = (("hidden", 32), ("batch_size", 32), ("model_batch", 4), ("seq_len", 8), ("stoch", 4),
        ("deter", 8), ("model_hidden", 16))  # fmt: skip


def run(*args, video=False, **kw):
    """The runner without JAX's persistent compilation cache (a process-wide setting that
    would reach every later test of this worker) and, unless asked for, without videos (both
    are tested in tests/test_runner_files.py and below)."""
    return runner.run(*args, compilation_cache=False, video=video, **kw)


def _cfg(agent, **kw):
    base = dict(
        agent=agent, env_steps=2000, prefill_steps=100, train_every=50, updates=4,
        eval_every=100, eval_episodes=1, checkpoint_every=10**9, overrides=TINY,
    )  # fmt: skip
    return RunConfig(**{**base, **kw})


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def _final(run_dir, template):
    path = checkpoint.latest(run_dir / "checkpoints")
    trees, meta = checkpoint.restore(path, {"state": template})
    return trees["state"], meta, Replay.load(path / "replay.npz")


SMALL_VRKN = (("latent", 8),)
SMALL_DREAMER = (("start_batch", 2), ("dreamer.actor_hidden", 16), ("dreamer.critic_hidden", 16),
                 ("dreamer.horizon", 5))  # fmt: skip
SMALL_PLANET = (("planet.candidates", 20), ("planet.iterations", 2), ("planet.top_k", 4),
                ("planet.horizon", 4))  # fmt: skip

#: the pixel variants: 48x48 images and thin convolutions (the tests compile at XLA's
#: optimisation level 0, where convolutions are slow)
PIXEL_CASES = {
    "sac_belief-vrkn-fusion": dict(
        agent="sac-belief", model="vrkn", obs="both", variant="fusion", image_size=48,
        overrides=TINY + SMALL_VRKN + (("conv_depth", 4),),
    ),
    "planet-rssm-occlusion": dict(
        agent="planet", model="rssm", obs="pixels", variant="occlusion", image_size=48,
        overrides=TINY + SMALL_PLANET + (("conv_depth", 4),),
    ),
}  # fmt: skip

#: every agent and environment variant, interrupted after its first episode and resumed (the
#: pixel variants only in the slow suite; by default they run once, below); tiny sizes
RESUMED = {
    "sac-noisy": dict(agent="sac", eval_every=100),
    "dreamer-vrkn-plain": dict(
        agent="dreamer", model="vrkn", variant="plain", overrides=TINY + SMALL_VRKN + SMALL_DREAMER
    ),
    "sac_belief-rssm-noisy": dict(agent="sac-belief", model="rssm"),
    "planet-rssm-noisy": dict(agent="planet", model="rssm", overrides=TINY + SMALL_PLANET),
    **{k: pytest.param(v, marks=pytest.mark.slow) for k, v in PIXEL_CASES.items()},
}


def _same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", RESUMED.values(), ids=RESUMED.keys())
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, case):
    from rl.runner import _driver, _env

    cfg = _cfg(**{"eval_every": 10**9, "updates": 2, **case})
    full = run(cfg, tmp_path / "full", progress=False)
    part = run(cfg, tmp_path / "part", progress=False, stop_after_episodes=1)
    assert not part["finished"] and part["steps"] == 125
    resumed = run(cfg, tmp_path / "part", progress=False, resume=True)
    steps = cfg.env_steps // 8  # cartpole's action repeat
    assert resumed == full and full["steps"] == steps and full["env_steps"] == cfg.env_steps
    assert np.isfinite(full["final_eval_return"]) and full["random_return"] is not None
    records = _records(tmp_path / "full")
    assert _records(tmp_path / "part") == records
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == (steps - cfg.prefill_steps) // cfg.train_every + 1
    losses = [v for r in train for k, v in r.items() if k.endswith("loss")]
    assert losses and np.isfinite(losses).all()
    template = _driver(cfg, _env(cfg, 0)).init(jax.random.key(0))
    (a, meta_a, rep_a), (b, meta_b, rep_b) = (
        _final(tmp_path / d, template) for d in ("full", "part")
    )
    _same_state(a, b)
    assert meta_a == meta_b and rep_a.num_rows == rep_b.num_rows == steps + 2
    for i in range(2):
        np.testing.assert_array_equal(rep_a.episode(i)["actions"], rep_b.episode(i)["actions"])
    assert (tmp_path / "full" / "returns.png").stat().st_size > 0
    if cfg.agent != "sac":  # world-model reports: open-loop predictions, reconstructions
        report = json.loads((tmp_path / "full" / "model_report.json").read_text())
        assert np.isfinite(report["open_loop_mse_per_step"]).all()
        assert (tmp_path / "full" / "model_predictions.png").stat().st_size > 0


@pytest.mark.parametrize("case", PIXEL_CASES.values(), ids=PIXEL_CASES.keys())
def test_pixel_variants_train_and_report(tmp_path, case):
    cfg = _cfg(**{**case, "env_steps": 1000, "train_every": 25, "updates": 2,
                  "eval_every": 10**9})  # fmt: skip
    video = cfg.variant == "fusion"  # a video with the model's reconstruction and prediction
    summary = run(cfg, tmp_path, progress=False, video=video)
    assert summary["finished"] and np.isfinite(summary["final_eval_return"])
    train = [r for r in _records(tmp_path) if r["kind"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["model_loss"]) for r in train)
    replay = Replay.load(checkpoint.latest(tmp_path / "checkpoints") / "replay.npz")
    ep = replay.episode(0)
    image = ep["obs"]["image"] if isinstance(ep["obs"], dict) else ep["obs"]
    assert image.shape == (126, 48, 48, 3) and image.dtype == np.uint8
    if cfg.variant == "fusion":  # images every 4..8 steps, the state every step
        seen = np.flatnonzero(ep["mask"][:, 0])
        assert seen[0] == 0 and 4 <= np.diff(seen).min() and np.diff(seen).max() <= 8
        assert ep["mask"][:, 1].all() and not image[~ep["mask"][:, 0]].any()
    report = json.loads((tmp_path / "model_report.json").read_text())
    assert np.isfinite(report["open_loop_mse_per_step"]).all()
    assert (tmp_path / "model_predictions.png").stat().st_size > 0
    if video:  # observation | reconstruction | open-loop prediction (grey before it starts)
        import imageio.v3 as iio

        frames = iio.imread(tmp_path / "videos" / "eval-000001000.gif")
        assert frames.shape[1:] == (48, 3 * 48, 3) and len(frames) > 60
        assert np.abs(frames[0, :, 96:].astype(int) - 128).max() <= 8  # (GIF palette)
        assert frames[-1, :, 96:].std() > 0


def test_runs_refuse_to_overwrite_or_resume_another_configuration(tmp_path):
    cfg = _cfg("random", env_steps=1000, eval_episodes=1)
    run(cfg, tmp_path, progress=False, stop_after_episodes=1)
    with pytest.raises(ConfigError, match="holds a run"):
        run(cfg, tmp_path, progress=False)  # never overwrite a run by accident
    with pytest.raises(ConfigError, match=r"different configuration: seed \(stored 0, given 1\)"):
        run(_cfg("random", seed=1), tmp_path, progress=False, resume=True)
    with pytest.raises(ValueError, match="unknown override 'hiden'"):
        run(_cfg("sac", overrides=(("hiden", 3),)), tmp_path / "typo", progress=False)
    with pytest.raises(ValueError, match="unknown override 'planet.candidate'"):
        run(_cfg("planet", overrides=(("planet.candidate", 3),)), tmp_path / "t2", progress=False)


def test_prefill_filters_with_the_executed_random_actions(tmp_path):
    """During the prefill the agent's belief is predicted through the uniform actions that
    were executed, not through the actions the agent would have taken (SAC on a KalMamba
    belief: agents work over every world model)."""
    from rl import drivers

    calls = []

    class Spy(drivers.Policy):
        def __call__(self, t, obs, mask, first):
            calls.append(("act", t, self.prev.copy()))
            return super().__call__(t, obs, mask, first)

        def executed(self, action):
            calls.append(("executed", action))
            super().executed(action)

    over = TINY + (("latent", 8), ("d_model", 8), ("d_state", 4))
    cfg = _cfg("sac-belief", model="kalmamba", prefill_steps=130, eval_every=10**9,
               eval_episodes=1, updates=2, overrides=over)  # fmt: skip
    orig = drivers.Policy
    drivers.Policy = Spy
    try:
        run(cfg, tmp_path, progress=False)
    finally:
        drivers.Policy = orig
    replay = Replay.load(checkpoint.latest(tmp_path / "checkpoints") / "replay.npz")
    # episode 0 lies inside the prefill (125 < 130 steps): the policy is not consulted
    acts = [c for c in calls if c[0] == "act"]
    assert acts[0][1] == 0 and len(acts) == 125 + 125  # episode 1 (125 steps) + one evaluation
    second = replay.episode(1)["actions"]
    executed = [c[1] for c in calls if c[0] == "executed"]
    assert len(executed) == 5  # steps 125..129 of episode 1 are prefill
    np.testing.assert_allclose(np.stack(executed), second[:5])
    np.testing.assert_allclose(acts[5][2], second[4].astype(np.float32))  # step 5 predicts via it
    # and the KalMamba world model and SAC on its belief trained (steps 150, 200, 250)
    train = [r for r in _records(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [150, 200, 250]
    assert all(np.isfinite(r["model_loss"]) and np.isfinite(r["critic_loss"]) for r in train)


def test_cli_runs_and_reports_against_random(tmp_path, capsys):
    from rl.cli import main

    main(["run", "--agent", "random", "--env-steps", "1000", "--eval-episodes", "1",
          "--variant", "none", "--run-dir", str(tmp_path), "--no-progress",
          "--no-compilation-cache", "--no-video"])  # fmt: skip
    out = capsys.readouterr().out
    assert "vs random policy" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["variant"] is None and summary["env_steps"] == 1000
    with pytest.raises(SystemExit):
        main(["run", "--resume"])  # resuming needs the run directory


def test_sigkilled_run_resumes_to_the_same_steps_with_no_replay_lost(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--agent", "random", "--variant", "none", "--env-steps", "4000", "--eval-episodes",
            "1", "--eval-every", "100000", "--checkpoint-every", "1", "--no-progress",
            "--no-compilation-cache", "--no-video"]  # fmt: skip
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rl", *args, "--run-dir", str(killed)])
    deadline = time.time() + 300
    while checkpoint.latest(killed / "checkpoints") is None:  # killed right after its first
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from rl.cli import main

    main(["run", *args, "--run-dir", str(killed), "--resume"])
    main(["run", *args, "--run-dir", str(tmp_path / "straight")])
    done = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("killed", "straight")]
    assert done[0] == done[1] and done[0]["steps"] == 500
    replays = [Replay.load(checkpoint.latest(tmp_path / d / "checkpoints") / "replay.npz")
               for d in ("killed", "straight")]  # fmt: skip
    assert replays[0].num_episodes == replays[1].num_episodes == 4
    for i in range(4):
        np.testing.assert_array_equal(replays[0].episode(i)["actions"],
                                      replays[1].episode(i)["actions"])  # fmt: skip
