"""Fault injection on a run's directory: a damaged or missing newest checkpoint, a torn last
metrics line, an interrupted checkpoint write. The resumed run takes the newest intact
checkpoint and ends identical to the uninterrupted run; with no intact checkpoint it stops with
an error naming the files and changes nothing."""

import logging
import shutil

import jax
import pytest

from rl import checkpoint, runner
from rl.replay import Replay
from rl.runner import RunConfig, _driver, _env
from tests.test_runner import TINY, _final, _records, _same_state

#: SAC on noisy states, 3 episodes of 125 steps; a checkpoint at every episode end
CFG = RunConfig(agent="sac", variant="noisy", env_steps=3000, prefill_steps=100, train_every=50,
                updates=2, eval_every=10**9, eval_episodes=1, checkpoint_every=1,
                overrides=TINY)  # fmt: skip


def run(*args, **kw):
    return runner.run(*args, progress=False, video=False, tensorboard=False,
                      compilation_cache=False, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run and one stopped after 2 episodes (checkpoints 125 and 250)."""
    root = tmp_path_factory.mktemp("runs")
    summary = run(CFG, root / "full")
    part = run(CFG, root / "part", stop_after_episodes=2)
    assert not part["finished"]
    assert [s for s, _ in checkpoint.steps(root / "part" / "checkpoints")] == [125, 250]
    return root, summary


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


#: (there is no LATEST marker to lose: resuming tries the checkpoint directories newest first)
FAULTS = {
    "trees truncated": lambda d: _truncate(d / "250" / "trees.npz"),
    "replay truncated": lambda d: _truncate(d / "250" / "replay.npz"),
    "meta deleted": lambda d: (d / "250" / "meta.json").unlink(),
    "meta empty": lambda d: (d / "250" / "meta.json").write_text(""),
    "directory gone": lambda d: shutil.rmtree(d / "250"),
}


def _count_episodes(monkeypatch) -> list:
    """Record every episode the runner plays (training and evaluation)."""
    played, play = [], runner.play_episode

    def counted(*args, **kw):
        played.append(1)
        return play(*args, **kw)

    monkeypatch.setattr(runner, "play_episode", counted)
    return played


def _assert_same_run(a, b):
    assert _records(a) == _records(b)
    template = _driver(CFG, _env(CFG, 0)).init(jax.random.key(0))
    (state_a, meta_a, replay_a), (state_b, meta_b, replay_b) = (_final(d, template) for d in (a, b))
    _same_state(state_a, state_b)
    assert meta_a == meta_b and replay_a.num_rows == replay_b.num_rows == 375 + 3
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["250", "375"]
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["250", "375"]


@pytest.mark.parametrize("fault", FAULTS)
def test_resume_skips_a_damaged_or_missing_newest_checkpoint(runs, tmp_path, caplog, fault,
                                                            monkeypatch):  # fmt: skip
    root, full = runs
    part = tmp_path / "part"
    shutil.copytree(root / "part", part)
    FAULTS[fault](part / "checkpoints")
    leftover = part / "checkpoints" / ".tmp-ckpt-killed"  # a write cut short, as large as
    leftover.mkdir()  # the replay it was writing
    shutil.copy(part / "checkpoints" / "125" / "replay.npz", leftover)
    played = _count_episodes(monkeypatch)
    with caplog.at_level(logging.WARNING):
        resumed = run(CFG, part, resume=True)
    assert resumed == full
    assert len(played) == 3  # episodes 2 and 3 and the evaluation: resumed at step 125
    skipped = f"skipping checkpoint {part / 'checkpoints' / '250'}" in caplog.text
    assert skipped == (fault != "directory gone")
    _assert_same_run(root / "full", part)
    assert not leftover.exists()


def test_resume_drops_a_torn_final_metrics_line(runs, tmp_path, caplog, monkeypatch):
    root, full = runs
    part = tmp_path / "part"
    shutil.copytree(root / "part", part)
    with (part / "metrics.jsonl").open("a") as f:
        f.write('{"step": 300, "kind": "tra')  # the disk filled up mid-line
    played = _count_episodes(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert run(CFG, part, resume=True) == full
    assert len(played) == 2  # episode 3 and the evaluation: resumed at step 250
    assert "dropping the torn final line" in caplog.text
    _assert_same_run(root / "full", part)


def test_resume_without_an_intact_checkpoint_changes_nothing(runs, tmp_path):
    root, _ = runs
    part = tmp_path / "part"
    shutil.copytree(root / "part", part)
    _truncate(part / "checkpoints" / "250" / "replay.npz")
    (part / "checkpoints" / "125" / "meta.json").unlink()
    before = {p: p.read_bytes() for p in sorted(part.rglob("*")) if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError) as info:
        run(CFG, part, resume=True)
    message = str(info.value)
    assert str(part / "checkpoints" / "250" / "replay.npz") in message
    assert str(part / "checkpoints" / "125" / "meta.json") in message
    assert {p: p.read_bytes() for p in sorted(part.rglob("*")) if p.is_file()} == before
    # the replay of the intact-looking older checkpoint is still readable by hand
    assert Replay.load(part / "checkpoints" / "125" / "replay.npz").num_episodes == 1
