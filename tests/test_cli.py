"""``pssm run``: every bad flag is a one-line usage error (status 2) naming the flag, before
anything is written; resuming checks the stored run and may extend it."""

import json
import shutil

import numpy as np
import pytest

from rl import checkpoint
from rl.cli import main
from rl.replay import Replay

USAGE_ERRORS = {
    "preset": (["--preset", "bogus"], "--preset"),
    "agent": (["--agent", "bogus"], "--agent"),
    "model": (["--model", "bogus"], "--model"),
    "task": (["--task", "cartpole-bogus"], "--task"),
    "variant": (["--variant", "bogus"], "--variant"),
    "obs": (["--obs", "bogus"], "--obs"),
    "pixels with noisy states": (["--obs", "pixels", "--variant", "noisy"], "--variant"),
    "sac from pixels": (["--agent", "sac", "--obs", "pixels", "--variant", "none"], "--obs"),
    "image size": (["--obs", "pixels", "--variant", "none", "--image-size", "40"], "--image-size"),
    "env steps 0": (["--env-steps", "0"], "--env-steps"),
    "env steps negative": (["--env-steps", "-5"], "--env-steps"),
    "eval every": (["--eval-every", "0"], "--eval-every"),
    "checkpoint every": (["--checkpoint-every", "0"], "--checkpoint-every"),
    "prefill": (["--prefill-steps", "-10"], "--prefill-steps"),
    "eval episodes": (["--eval-episodes", "0"], "--eval-episodes"),
    "train every": (["--train-every", "0"], "--train-every"),
    "updates": (["--updates", "0"], "--updates"),
    "action repeat": (["--action-repeat", "0"], "--action-repeat"),
    "not a number": (["--seed", "one"], "--seed"),
    "override": (["--set", "hiden=3"], "--set"),
    "override form": (["--set", "hidden"], "--set"),
    "resume without dir": (["--resume"], "--resume"),
    "resume a missing dir": (["--resume", "--run-dir", "does/not/exist"], "--run-dir"),
    "unknown flag": (["--bogus", "1"], "--bogus"),
}


def _usage_error(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(["run", *args, "--no-progress", "--no-compilation-cache"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    return err


@pytest.mark.parametrize("case", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_bad_flags_are_one_line_usage_errors_and_write_nothing(tmp_path, monkeypatch, capsys,
                                                               case):  # fmt: skip
    args, flag = case
    monkeypatch.chdir(tmp_path)
    err = _usage_error(capsys, args)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pssm run: error: "), err
    assert flag in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no runs/<name>/, no config.json


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


ARGS = ["--agent", "random", "--variant", "none", "--eval-episodes", "1", "--no-progress",
        "--no-compilation-cache", "--no-video"]  # fmt: skip


def test_resume_names_differences_refuses_damage_and_extends_a_finished_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["run", *ARGS, "--env-steps", "1000", "--run-dir", str(run_dir)])
    before = _snapshot(run_dir)
    # a new run over it, a different configuration, fewer steps: usage errors, nothing changed
    assert "--run-dir" in _usage_error(capsys, [*ARGS, "--run-dir", str(run_dir)])
    err = _usage_error(capsys, [*ARGS, "--run-dir", str(run_dir), "--resume", "--seed", "3"])
    assert "--seed (stored 0, given 3)" in err and "--env-steps" not in err
    err = _usage_error(capsys, ["--run-dir", str(run_dir), "--resume", "--env-steps", "500"])
    assert "--env-steps (stored 1000, given 500, it may only be raised)" in err
    assert _snapshot(run_dir) == before
    # no intact checkpoint: status 1, the files named, nothing changed
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for _, path in checkpoint.steps(broken / "checkpoints"):
        (path / "meta.json").write_text("")
    before_broken = _snapshot(broken)
    with pytest.raises(SystemExit) as info:
        main(["run", "--run-dir", str(broken), "--resume", "--env-steps", "2000"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "meta.json is unreadable" in err and "Traceback" not in err
    assert _snapshot(broken) == before_broken
    # checkpoints of an older layout (ckpt-<step>/ and LATEST) are not taken for an empty run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    for _, path in checkpoint.steps(old / "checkpoints"):
        path.rename(path.with_name(f"ckpt-{int(path.name):010d}"))
    (old / "checkpoints" / "LATEST").write_text("ckpt-0000000125")
    before_old = _snapshot(old)
    assert "--run-dir" in _usage_error(capsys, [*ARGS, "--run-dir", str(old)])
    with pytest.raises(SystemExit) as info:
        main(["run", "--run-dir", str(old), "--resume"])
    assert info.value.code == 1 and "LATEST, ckpt-0000000125" in capsys.readouterr().err
    assert _snapshot(old) == before_old
    # raising --env-steps extends the finished run: flags left out keep the stored values
    main(["run", "--run-dir", str(run_dir), "--resume", "--env-steps", "2000"])
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["env_steps"] == 2000 and stored["agent"] == "random"
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["finished"] and done["steps"] == 250 and len(done["evals"]) == 2
    # it played the episodes a straight 2000-step run plays
    main(["run", *ARGS, "--env-steps", "2000", "--run-dir", str(tmp_path / "straight")])
    replays = [Replay.load(checkpoint.latest(d / "checkpoints") / "replay.npz")
               for d in (run_dir, tmp_path / "straight")]  # fmt: skip
    assert replays[0].num_episodes == replays[1].num_episodes == 2
    for i in range(2):
        np.testing.assert_array_equal(
            replays[0].episode(i)["actions"], replays[1].episode(i)["actions"]
        )
