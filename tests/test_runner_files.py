"""What a run directory holds besides checkpoints: TensorBoard event files of every metric, a
video at each evaluation (or a logged note when the camera cannot be rendered), and JAX's
persistent compilation cache shared by repeated runs."""

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from rl import runner
from rl.runner import RunConfig
from tests.test_runner import TINY

#: two episodes of SAC from states, an evaluation after each
CFG = RunConfig(agent="sac", variant=None, env_steps=2000, prefill_steps=100, train_every=50,
                updates=2, eval_every=100, eval_episodes=1, overrides=TINY)  # fmt: skip


def _events(logdir: Path) -> dict:
    """``{tag: [(step, value), ...]}`` read from TensorBoard event files (TFRecord framing:
    length, its CRC, the serialised ``Event``, its CRC)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_event_files_hold_every_metric_and_videos_show_each_evaluation(tmp_path):
    summary = runner.run(CFG, tmp_path, progress=False, compilation_cache=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = _events(tmp_path / "tensorboard")
    expected = {}
    for r in records:
        for name, value in r.items():
            if name not in ("step", "kind", "episode", "env_steps"):
                expected.setdefault(f"{r['kind']}/{name}", []).append((r["step"] * 8, value))
    assert {"train/critic_loss", "episode/return", "eval/eval_return", "random/eval_return"} <= set(
        expected
    )
    assert set(events) == set(expected)
    for tag, points in expected.items():
        steps, values = zip(*points, strict=True)
        assert [s for s, _ in events[tag]] == list(steps), tag
        np.testing.assert_allclose([v for _, v in events[tag]], values, rtol=1e-6, err_msg=tag)
    # one video per evaluation, named by the environment step, of the rendered camera view
    videos = sorted((tmp_path / "videos").iterdir())
    assert [p.name for p in videos] == ["eval-000001000.gif", "eval-000002000.gif"]
    assert [e[0] for e in summary["evals"]] == [125, 250]
    frames = iio.imread(videos[0])
    # (the GIF writer merges identical consecutive frames: at most one per agent step)
    assert frames.shape[1:] == (64, 64, 3) and 50 < len(frames) <= 125
    assert frames.std() > 5 and np.abs(np.diff(frames.astype(int), axis=0)).max() > 0


def test_a_run_without_rendering_logs_why_it_has_no_video(tmp_path, monkeypatch, caplog):
    from rl.envs.dmc import DMCEnv

    def no_gl(self, size=None):
        raise RuntimeError("cannot initialize EGL")

    monkeypatch.setattr(DMCEnv, "render", no_gl)
    cfg = RunConfig(agent="random", variant=None, env_steps=2000, eval_every=100,
                    eval_episodes=1)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        summary = runner.run(cfg, tmp_path, progress=False, compilation_cache=False)
    assert summary["finished"] and len(summary["evals"]) == 2
    notes = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    notes = [r for r in notes if r["kind"] == "note"]
    assert len(notes) == 1 and "cannot initialize EGL" in notes[0]["note"]  # logged once
    assert "no evaluation video" in caplog.text and not (tmp_path / "videos").exists()


CACHED_RUN = textwrap.dedent(
    """
    import sys, time
    import jax
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(1) if name == "/jax/compilation_cache/cache_hits" else None)
    from rl import runner
    from rl.runner import RunConfig
    from tests.test_runner import TINY
    cfg = RunConfig(agent="sac", variant=None, env_steps=1000, prefill_steps=50,
                    train_every=50, updates=2, eval_episodes=1, overrides=TINY)
    start = time.time()
    runner.run(cfg, sys.argv[1], progress=False, video=False, tensorboard=False)
    print(len(hits), time.time() - start)
    """
)


def test_a_repeated_run_loads_its_programs_from_the_compilation_cache(tmp_path):
    env = {**os.environ, "PSSM_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    root = Path(__file__).resolve().parents[1]
    hits, written = [], []
    for i in range(2):
        out = subprocess.run(
            [sys.executable, "-c", CACHED_RUN, str(tmp_path / f"run{i}")], env=env, cwd=root,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        hits.append(int(out.stdout.split()[-2]))
        written.append(sorted(p.name for p in (tmp_path / "cache" / "jax").iterdir()))
        print(out.stdout.strip())
    # which programs are written depends on their compile time (at least 0.2 s, so it varies
    # with the machine's load); every program the first run wrote, the second run loads
    assert any("update_many" in name for name in written[0]), written[0]
    assert hits[1] >= len(written[0]), (hits, written[0])
