"""Run checkpoints: exact round trips, atomic replacement, clear errors on mismatch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl import checkpoint


def _tree(seed):
    k = jax.random.key(seed)
    params = {"w": jax.random.normal(k, (3, 4)), "b": jnp.arange(4, dtype=jnp.float32)}
    return {"params": params, "opt": optax.adam(1e-3).init(params), "key": k,
            "step": jnp.asarray(seed, jnp.int32)}  # fmt: skip


def test_round_trip_is_exact(tmp_path):
    tree = _tree(3)
    checkpoint.save(tmp_path, 7, {"state": tree}, {"episodes": 2})
    path = checkpoint.latest(tmp_path)
    assert path is not None and path.name.endswith("7")
    trees, meta = checkpoint.restore(path, {"state": _tree(0)})
    assert meta == {"step": 7, "episodes": 2}
    for a, b in zip(jax.tree.leaves(trees["state"]), jax.tree.leaves(tree), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    # the restored key draws the same numbers
    np.testing.assert_array_equal(
        jax.random.normal(trees["state"]["key"], (5,)), jax.random.normal(tree["key"], (5,))
    )


def test_keeps_newest_and_ignores_partial_writes(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"state": _tree(step)}, {}, keep=2)
    names = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert names == ["ckpt-0000000002", "ckpt-0000000003"]
    # a crash mid-write leaves a temporary directory that is never read
    (tmp_path / ".tmp-ckpt-crash").mkdir()
    assert checkpoint.latest(tmp_path).name == "ckpt-0000000003"


def test_mismatched_template_raises(tmp_path):
    checkpoint.save(tmp_path, 1, {"state": {"w": jnp.zeros((2, 2))}}, {})
    with pytest.raises(ValueError, match="shape"):
        checkpoint.restore(checkpoint.latest(tmp_path), {"state": {"w": jnp.zeros((3, 2))}})
    with pytest.raises(ValueError, match="leaves"):
        checkpoint.restore(
            checkpoint.latest(tmp_path), {"state": {"w": jnp.zeros((2, 2)), "v": jnp.zeros(1)}}
        )
    assert checkpoint.latest(tmp_path / "nothing") is None
