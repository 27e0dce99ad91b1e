"""Checkpoints and metric logs of runs: one mechanism for :func:`~inference.training.fit` and the
reinforcement-learning runner (:mod:`rl.runner`).

A checkpoint is a directory ``<root>/<step>/`` holding ``trees.npz`` (every leaf of the named
pytrees, PRNG keys as their raw key data), any extra files (e.g. a replay buffer) and
``meta.json``, written last: the step, the caller's JSON counters and the size and CRC-32 of
every other file. It is written under a temporary name ``<root>/.tmp-ckpt-*``, synced to disk
and renamed into place, so a process killed at any moment (SIGKILL included) leaves every
earlier checkpoint intact and at worst a temporary directory, which :func:`remove_temporary`
deletes (the training loop and the runner call it when they start and when they finish).

Reading never trusts a single marker: :func:`restore_newest` tries the checkpoints newest first
and uses the first that *verifies* (``meta.json`` parses, every listed file has its size and
CRC-32) and loads, logging each one it skipped and why. With checkpoints present but none
intact it raises :class:`CheckpointError` naming every file at fault and touches nothing.
Restoring needs a *template* of each pytree (e.g. a freshly initialised state): leaves come back
in the template's structure and dtypes, so a changed configuration is a clear ``ValueError``
rather than a silent mismatch.

Metric logs are JSON lines with a ``"step"`` each. :func:`read_metrics` keeps the records up
to a checkpoint's step (the history a resumed run continues) and drops a torn final line (a
write cut short by power loss or a full disk) with a logged warning.

A finished run's parameters are exported with :func:`save_params` (one ``.npz`` array per leaf,
named by its tree path, so the file is readable without the code) and read back by
:func:`load_params` into a template of the same configuration.
"""

import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
log = logging.getLogger(__name__)

META = "meta.json"
TREES = "trees.npz"
_TMP_PREFIX = ".tmp-ckpt-"


class CheckpointError(Exception):
    """A checkpoint (or a run's set of checkpoints) that cannot be read; names the files."""


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_numpy(leaf):
    return np.asarray(jax.random.key_data(leaf)) if _is_key(leaf) else np.asarray(leaf)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def steps(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, directory), ...]`` of every checkpoint directory under ``root`` (intact or
    not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(p.name), p) for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(found)


def others(root: str | os.PathLike) -> list[Path]:
    """What else ``root`` holds besides checkpoints and temporary directories (e.g. the
    checkpoints of an older version of this module), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.isdigit()
                  and not p.name.startswith(_TMP_PREFIX))  # fmt: skip


def save(
    root: str | os.PathLike,
    step: int,
    trees: dict[str, PyTree],
    meta: dict | None = None,
    *,
    keep: int = 2,
    files: dict[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write checkpoint ``step`` and keep the newest ``keep`` checkpoints up to it.

    Args:
        root: the checkpoints' directory (created).
        step: the checkpoint's step (its directory name).
        trees: named pytrees of arrays.
        meta: JSON-able counters, returned by :func:`restore`.
        keep: checkpoints with steps up to ``step`` to keep (newest first); later ones (left
            by a run resumed from an older checkpoint) are replaced when their step is written
            again.
        files: ``{name: writer}``; ``writer(path)`` writes the file (e.g. a replay buffer's
            ``save``) into the checkpoint before it is complete; every file it writes is
            covered by the checksums.

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    step = int(step)
    final = root / str(step)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    arrays = {}
    for name, tree in trees.items():
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            arrays[f"{name}/{i}"] = _to_numpy(leaf)
    with open(tmp / TREES, "wb") as f:
        np.savez(f, **arrays)
    for name, writer in (files or {}).items():
        writer(tmp / name)
    listed = {}
    for p in sorted(x for x in tmp.iterdir() if x.is_file()):
        _sync(p)
        listed[p.name] = {"size": p.stat().st_size, "crc32": _crc32(p)}
    record = {"step": step, "files": listed, "meta": meta or {}}
    with open(tmp / META, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _sync(tmp)
    if final.exists():  # a damaged checkpoint of a step being redone: move it out of the way
        os.replace(final, Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root)) / "old")
    os.replace(tmp, final)
    _sync(root)
    kept = [p for s, p in steps(root) if s <= step]
    for old in kept[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    remove_temporary(root)
    return final


def remove_temporary(root: str | os.PathLike) -> list[Path]:
    """Delete what interrupted writes left under ``root``; returns the removed paths."""
    root = Path(root)
    removed = sorted(root.glob(_TMP_PREFIX + "*")) if root.is_dir() else []
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def verify(path: str | os.PathLike) -> dict:
    """Check the checkpoint at ``path`` against its ``meta.json``; returns the caller's meta
    with ``"step"``.

    Raises:
        CheckpointError: naming the file that is missing, truncated or altered.
    """
    path = Path(path)
    meta_path = path / META
    try:
        record = json.loads(meta_path.read_text())
        listed, meta, step = record["files"], record["meta"], int(record["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({type(e).__name__}: {e})") from None
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file} has {size} bytes, {expected['size']} were written")
        if _crc32(file) != expected["crc32"]:
            raise CheckpointError(f"{file} does not match its checksum (altered on disk)")
    return {"step": step, **meta}


def restore(path: str | os.PathLike, templates: dict[str, PyTree]) -> tuple[dict, dict]:
    """Verify the checkpoint at ``path`` and read it into the structures of ``templates``.

    Returns:
        ``(trees, meta)``: the pytrees by name and the meta given to :func:`save` with
        ``"step"``.

    Raises:
        CheckpointError: the checkpoint is damaged (names the file).
        ValueError: a tree's number of leaves or a leaf's shape differs from its template (a
            different configuration).
    """
    path = Path(path)
    meta = verify(path)
    try:
        with np.load(path / TREES) as data:
            stored = dict(data)
    except Exception as e:  # verified, yet unreadable: not written by this module
        raise CheckpointError(f"{path / TREES} is unreadable ({type(e).__name__}: {e})") from None
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


def restore_newest(root: str | os.PathLike, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """``(path, load(path))`` for the newest checkpoint under ``root`` that verifies and loads.

    ``load`` (e.g. ``lambda p: restore(p, templates)``) signals a damaged checkpoint by raising
    :class:`CheckpointError`; each one skipped is logged with the reason. Nothing is deleted.

    Returns:
        ``None`` when ``root`` holds nothing but temporary directories (or does not exist).

    Raises:
        CheckpointError: checkpoints exist but none is intact (every reason in the message),
            or ``root`` holds only files this module did not write.
        ValueError: whatever ``load`` raises besides :class:`CheckpointError` (e.g. a template
            mismatch) is not damage and propagates at once.
    """
    found = steps(root)
    reasons = []
    for _, path in reversed(found):
        try:
            return path, load(path)
        except CheckpointError as e:
            reasons.append(str(e))
            log.warning("skipping checkpoint %s: %s", path, e)
    if not found:
        if foreign := others(root):
            names = ", ".join(p.name for p in foreign)
            raise CheckpointError(f"no checkpoint under {root} that this version reads; it holds "
                                  f"{names} (written by an older version?)")  # fmt: skip
        return None
    raise CheckpointError(
        f"no intact checkpoint under {root} (nothing was changed): " + "; ".join(reasons)
    )


def latest(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory under ``root`` that verifies, or ``None``."""
    for _, path in reversed(steps(root)):
        try:
            verify(path)
            return path
        except CheckpointError:
            continue
    return None


def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
    """The records of the JSON-lines file ``path`` with ``step <= up_to_step`` (all when
    ``None``), rewriting the file to hold exactly those.

    A final line that does not parse (a torn write) is dropped with a logged warning; a
    damaged line before it raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    records = []
    if path.exists():
        lines = path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number < last:
                    raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from None
                log.warning("%s: dropping the torn final line %d: %.80r", path, number, line)
                continue
            if up_to_step is None or record["step"] <= up_to_step:
                records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(tmp, path)
    return records


def append_metrics(path: str | os.PathLike, records: list[dict]) -> None:
    """Append ``records`` to the JSON-lines file ``path`` (NaN / inf as JSON's common extension,
    which ``json.loads`` reads) and flush."""
    with Path(path).open("a") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
        file.flush()


def save_params(path, params: dict) -> Path:
    """Constrained parameters as an ``.npz``, one array per leaf, named by its tree path (so a
    finished run can be evaluated again without retraining: :func:`load_params`)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def load_params(path, like: dict) -> dict:
    """The parameters :func:`save_params` wrote, in the tree of ``like`` (e.g.
    ``objective.constrain(params)`` of a freshly initialised run of the same configuration);
    raises ``ValueError`` when the saved leaves and ``like`` disagree in names or shapes."""
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [jax.tree_util.keystr(k) for k, _ in leaves]
    extra, missing = sorted(set(arrays) - set(names)), sorted(set(names) - set(arrays))
    if extra or missing:
        raise ValueError(f"{path}: saved leaves {extra} are not in the template, {missing} are "
                         "missing")  # fmt: skip
    for name, (_, leaf) in zip(names, leaves, strict=True):
        if arrays[name].shape != np.shape(leaf):
            raise ValueError(f"{path}: {name} has shape {arrays[name].shape}, the template "
                             f"{np.shape(leaf)}")  # fmt: skip
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[n]) for n in names])
