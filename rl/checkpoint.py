"""Checkpoints of whole runs: pytrees of arrays plus JSON counters, written atomically.

A checkpoint is a directory ``<root>/ckpt-<step>/`` holding ``trees.npz`` (every leaf of the
named pytrees, PRNG keys as their raw key data) and ``meta.json``; it is first written under a
temporary name and renamed into place, and ``<root>/LATEST`` names the newest complete one, so
a process killed at any moment (even by SIGKILL) leaves the previous checkpoint intact.
Restoring needs a *template* of each pytree (e.g. a freshly initialised state): leaves are
put back into the template's structure with the template's dtypes, which catches a changed
configuration as a clear error instead of a silent mismatch.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

PyTree = Any


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf):
    return np.asarray(jax.random.key_data(leaf)) if _is_key(leaf) else np.asarray(leaf)


def save(
    root: str | os.PathLike,
    step: int,
    trees: dict[str, PyTree],
    meta: dict,
    keep: int = 2,
    files: dict[str, Any] | None = None,
):
    """Write checkpoint ``step`` with the pytrees ``trees``, the JSON-able ``meta`` and the
    ``files`` (``{name: writer}``, ``writer(path)`` writes the file, e.g. a replay buffer's
    ``save``; written before the checkpoint is renamed into place, so a complete checkpoint
    always has them); keep the newest ``keep`` checkpoints. Returns the checkpoint directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{int(step):010d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    arrays = {}
    for name, tree in trees.items():
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            arrays[f"{name}/{i}"] = _to_numpy(leaf)
    with open(tmp / "trees.npz", "wb") as f:
        np.savez(f, **arrays)
    for name, writer in (files or {}).items():
        writer(tmp / name)
    (tmp / "meta.json").write_text(json.dumps({"step": int(step), **meta}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".LATEST.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "LATEST")
    for old in sorted(root.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or ``None``."""
    marker = Path(root) / "LATEST"
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    return path if (path / "meta.json").exists() else None


def restore(path: str | os.PathLike, templates: dict[str, PyTree]) -> tuple[dict, dict]:
    """Read the checkpoint at ``path`` into the structures of ``templates``.

    Returns ``(trees, meta)``. Raises ``ValueError`` when a tree's number of leaves, a leaf's
    shape or a name differs from its template.
    """
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    with np.load(path / "trees.npz") as data:
        stored = dict(data)
    trees = {}
    for name, template in templates.items():
        leaves, treedef = jax.tree.flatten(template)
        count = sum(1 for k in stored if k.startswith(f"{name}/"))
        if count != len(leaves):
            raise ValueError(
                f"checkpoint {path}: '{name}' has {count} leaves, the current run {len(leaves)}"
                " (a different configuration?)"
            )
        restored = []
        for i, leaf in enumerate(leaves):
            value = stored[f"{name}/{i}"]
            if _is_key(leaf):
                restored.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf)))
                continue
            if value.shape != np.shape(leaf):
                raise ValueError(
                    f"checkpoint {path}: leaf {i} of '{name}' has shape {value.shape}, the "
                    f"current run {np.shape(leaf)} (a different configuration?)"
                )
            dtype = getattr(leaf, "dtype", value.dtype)
            restored.append(jax.numpy.asarray(value, dtype=dtype))
        trees[name] = jax.tree.unflatten(treedef, restored)
    return trees, meta
