"""The runner: a run interrupted and resumed equals the uninterrupted run, step for step."""

import json

import jax
import numpy as np
import pytest

from rl import checkpoint
from rl.replay import Replay
from rl.runner import RunConfig, run

TINY = (("hidden", 32), ("batch_size", 32), ("model_batch", 4), ("seq_len", 8), ("stoch", 4),
        ("deter", 8), ("model_hidden", 16))  # fmt: skip


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


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = _cfg("sac")
    full = run(cfg, tmp_path / "full", progress=False)
    part = run(cfg, tmp_path / "part", progress=False, stop_after_episodes=1)
    assert not part["finished"] and part["steps"] == 125
    with pytest.raises(FileExistsError):
        run(cfg, tmp_path / "part", progress=False)  # never overwrite a run by accident
    with pytest.raises(ValueError, match="different configuration"):
        run(_cfg("sac", seed=1), tmp_path / "part", progress=False, resume=True)
    resumed = run(cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed == full and full["steps"] == 250 and full["env_steps"] == 2000
    assert _records(tmp_path / "part") == _records(tmp_path / "full")
    from rl.drivers import make_driver
    from rl.runner import _env

    template = make_driver(cfg, _env(cfg, 0)).init(jax.random.key(0))
    (a, meta_a, rep_a), (b, meta_b, rep_b) = (
        _final(tmp_path / d, template) for d in ("full", "part")
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)
    assert meta_a == meta_b and rep_a.num_rows == rep_b.num_rows == 250 + 2
    np.testing.assert_array_equal(rep_a.episode(1)["actions"], rep_b.episode(1)["actions"])
    # the random baseline and evaluations are in the summary, and the plot was written
    assert full["random_return"] is not None and len(full["evals"]) == 2
    assert (tmp_path / "full" / "returns.png").stat().st_size > 0


def test_sac_on_rssm_belief_trains_finite(tmp_path):
    summary = run(_cfg("sac-belief", model="rssm", env_steps=2000, eval_every=10**9), tmp_path,
                  progress=False)  # fmt: skip
    assert summary["finished"] and summary["model"] == "rssm"
    train = [r for r in _records(tmp_path) if r["kind"] == "train"]
    assert train and all(np.isfinite(r["model_loss"]) and np.isfinite(r["critic_loss"])
                         for r in train)  # fmt: skip


def test_cli_runs_and_reports_against_random(tmp_path, capsys):
    from rl.cli import main

    main(["run", "--agent", "random", "--env-steps", "1000", "--eval-episodes", "1",
          "--variant", "none", "--run-dir", str(tmp_path), "--no-progress"])  # fmt: skip
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
            "1", "--eval-every", "100000", "--checkpoint-every", "1", "--no-progress"]  # fmt: skip
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


@pytest.mark.parametrize("agent", ["dreamer", "planet"])
def test_model_based_agents_run_and_report(tmp_path, agent):
    summary = run(_cfg(agent, env_steps=1000, eval_every=10**9, updates=2), tmp_path,
                  progress=False)  # fmt: skip
    assert summary["finished"] and np.isfinite(summary["final_eval_return"])
    train = [r for r in _records(tmp_path) if r["kind"] == "train"]
    assert train and all(np.isfinite(r["model_loss"]) for r in train)
    report = json.loads((tmp_path / "model_report.json").read_text())
    assert np.isfinite(report["open_loop_mse_per_step"]).all()
    assert (tmp_path / "model_predictions.png").stat().st_size > 0
