"""Run checkpoints: exact round trips, atomic replacement, damage found and skipped, torn metric
logs, clear errors on mismatch; and the training loop resuming past a damaged checkpoint."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from inference import training
from rl import checkpoint


def _tree(seed):
    k = jax.random.key(seed)
    params = {"w": jax.random.normal(k, (3, 4)), "b": jnp.arange(4, dtype=jnp.float32)}
    return {"params": params, "opt": optax.adam(1e-3).init(params), "key": k,
            "step": jnp.asarray(seed, jnp.int32)}  # fmt: skip


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _snapshot(root):
    """Every file under ``root`` with its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_is_exact(tmp_path):
    tree = _tree(3)
    checkpoint.save(tmp_path, 7, {"state": tree}, {"episodes": 2})
    path = checkpoint.latest(tmp_path)
    assert path is not None and path.name == "7"
    trees, meta = checkpoint.restore(path, {"state": _tree(0)})
    assert meta == {"step": 7, "episodes": 2}
    _assert_same(trees["state"], tree)
    # the restored key draws the same numbers
    np.testing.assert_array_equal(
        jax.random.normal(trees["state"]["key"], (5,)), jax.random.normal(tree["key"], (5,))
    )


def test_keeps_newest_and_removes_partial_writes(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"state": _tree(step)}, {}, keep=2)
    assert [s for s, _ in checkpoint.steps(tmp_path)] == [2, 3]
    # a crash mid-write leaves a temporary directory that is never read, and removed
    (tmp_path / ".tmp-ckpt-crash").mkdir()
    (tmp_path / ".tmp-ckpt-crash" / "replay.npz").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "3"
    assert checkpoint.remove_temporary(tmp_path) == [tmp_path / ".tmp-ckpt-crash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    # checkpoints after the one written (left by a run resumed from an older one) are kept
    # until their step is written again; pruning counts only those up to it
    checkpoint.save(tmp_path, 1, {"state": _tree(1)}, {}, keep=1)
    assert [s for s, _ in checkpoint.steps(tmp_path)] == [1, 2, 3]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "trees truncated": (lambda p: _truncate(p / "trees.npz"), "trees.npz has"),
    "extra file truncated": (lambda p: _truncate(p / "extra.bin"), "extra.bin has"),
    "byte flipped": (lambda p: _flip_byte(p / "trees.npz"), "trees.npz does not match"),
    "meta deleted": (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    "meta empty": (lambda p: (p / "meta.json").write_text(""), "meta.json is unreadable"),
    "file deleted": (lambda p: (p / "extra.bin").unlink(), "extra.bin is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_newest_is_skipped_with_its_reason(tmp_path, caplog, damage):
    hurt, reason = damage
    files = {"extra.bin": lambda path: path.write_bytes(bytes(range(256)) * 64)}
    for step in (4, 8):
        checkpoint.save(tmp_path, step, {"state": _tree(step)}, {"n": step}, files=files)
    hurt(tmp_path / "8")
    with pytest.raises(checkpoint.CheckpointError, match=reason):
        checkpoint.verify(tmp_path / "8")
    before = _snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        path, (trees, meta) = checkpoint.restore_newest(
            tmp_path, lambda p: checkpoint.restore(p, {"state": _tree(0)})
        )
    assert path.name == "4" and meta == {"step": 4, "n": 4}
    _assert_same(trees["state"], _tree(4))
    assert f"skipping checkpoint {tmp_path / '8'}" in caplog.text and reason in caplog.text
    assert _snapshot(tmp_path) == before  # nothing deleted or rewritten
    assert checkpoint.latest(tmp_path).name == "4"


def test_no_intact_checkpoint_names_every_file_and_changes_nothing(tmp_path):
    for step in (4, 8):
        checkpoint.save(tmp_path, step, {"state": _tree(step)}, {})
    _truncate(tmp_path / "8" / "trees.npz")
    (tmp_path / "4" / "meta.json").unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_newest(tmp_path, lambda p: checkpoint.restore(p, {"state": _tree(0)}))
    assert str(tmp_path / "8" / "trees.npz") in str(info.value)
    assert str(tmp_path / "4" / "meta.json") in str(info.value)
    assert _snapshot(tmp_path) == before
    assert checkpoint.latest(tmp_path) is None
    assert checkpoint.restore_newest(tmp_path / "none", lambda p: p) is None
    # what an older version wrote is named, not taken for an empty run
    old = tmp_path / "old"
    (old / "ckpt-0000000125").mkdir(parents=True)
    (old / "LATEST").write_text("ckpt-0000000125")
    with pytest.raises(checkpoint.CheckpointError, match="it holds LATEST, ckpt-0000000125"):
        checkpoint.restore_newest(old, lambda p: p)


def test_mismatched_template_raises(tmp_path):
    checkpoint.save(tmp_path, 1, {"state": {"w": jnp.zeros((2, 2))}}, {})
    with pytest.raises(ValueError, match="shape"):
        checkpoint.restore(checkpoint.latest(tmp_path), {"state": {"w": jnp.zeros((3, 2))}})
    with pytest.raises(ValueError, match="leaves"):
        checkpoint.restore(
            checkpoint.latest(tmp_path), {"state": {"w": jnp.zeros((2, 2)), "v": jnp.zeros(1)}}
        )
    # a mismatch is not damage: it is raised at once, not skipped
    with pytest.raises(ValueError, match="shape"):
        checkpoint.restore_newest(
            tmp_path, lambda p: checkpoint.restore(p, {"state": {"w": jnp.zeros((3, 2))}})
        )
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_torn_final_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)]
    checkpoint.append_metrics(path, records)
    with path.open("a") as f:
        f.write('{"step": 5, "loss": 0.16')  # power lost mid-line
    with caplog.at_level(logging.WARNING):
        assert checkpoint.read_metrics(path, up_to_step=3) == records[:4]
    assert "torn final line 6" in caplog.text
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]
    path.write_text('{"step": 0}\n{"step": 1,\n{"step": 2}\n')  # damage inside: an error
    with pytest.raises(ValueError, match="line 2"):
        checkpoint.read_metrics(path)


def _quadratic():
    """A tiny objective whose minibatches (hence parameters) depend on every step's key."""

    def init(key, batch):
        return {"w": jnp.zeros(2)}, jnp.zeros((), jnp.int32)

    def loss(params, aux, key, batch):
        noise = 0.1 * jax.random.normal(key, (2,))
        value = jnp.sum((params["w"] - batch["y"].mean(0) + noise) ** 2)
        return value, {"count": aux}, aux

    return training.Objective(init, loss, lambda p: p, lambda aux, params, metrics: aux + 1)


#: one objective and optimizer for every fit below: their compiled steps are shared
QUADRATIC, SGD = _quadratic(), optax.sgd(0.05)


@pytest.mark.parametrize("damage", ["trees truncated", "meta deleted", "directory gone"])
def test_fit_resumes_from_the_newest_intact_checkpoint(tmp_path, caplog, damage):
    data = {"y": jnp.arange(24.0).reshape(12, 2)}
    fit = lambda **kw: training.fit(
        QUADRATIC, data, SGD, **{"batch_size": 3, "steps_per_call": 4,
        "key": jax.random.key(0), "progress": False, "checkpoint_every": 4, **kw},
    )  # fmt: skip
    full, full_history = fit(num_steps=12)
    fit(num_steps=8, run_dir=tmp_path)  # checkpoints 4 and 8
    newest = tmp_path / "checkpoints" / "8"
    if damage == "directory gone":
        import shutil

        shutil.rmtree(newest)
    else:
        DAMAGE[damage][0](newest)
    (tmp_path / "checkpoints" / ".tmp-ckpt-killed").mkdir()  # an interrupted write
    with caplog.at_level(logging.WARNING):
        state, history = fit(num_steps=12, run_dir=tmp_path, resume=True)
    _assert_same(state, full)
    assert history == full_history
    assert (f"skipping checkpoint {newest}" in caplog.text) == (damage != "directory gone")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "4", "8"]
    # with no intact checkpoint, resuming stops before anything is written
    for _, path in checkpoint.steps(tmp_path / "checkpoints"):
        (path / "meta.json").unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        fit(num_steps=16, run_dir=tmp_path, resume=True)
    assert _snapshot(tmp_path) == before
