"""Recorded sequence data sets from dm_control tasks, cached on disk by a content key.

:func:`generate` runs ``num_sequences`` episodes of a task (through :func:`rl.envs.make`, with
any of its variants) for ``length`` agent steps each, under uniform random actions, given
actions, or a policy, and records per sequence ``n`` and step ``t`` (time convention of
:mod:`rl.replay`: ``actions[n, t]`` is taken at the step-``t`` observation and
``rewards[n, t]`` received for it)::

    image            (N, T, S, S, 3) uint8   camera 0; zeros where absent (fusion), discs drawn
                                             over it (occlusion)          [if images]
    state            (N, T, s) float32       flat observation dict (+ observation noise)
    proprio          (N, T, p) float32       proprioceptive part (+ observation noise) [if defined]
    mask             (N, T, K) bool          per-modality flags, K in metadata["modalities"]
                                             ((N, T) when there is one modality)
    pixel_mask       (N, T, S, S) bool       True where visible              [if occlusion]
    actions          (N, T, u) float32       the agent's actions
    applied_actions  (N, T, u) float32       executed actions (after transition noise, clipping)
    rewards          (N, T) float32
    discounts        (N, T) float32          0 where obs_t is terminal
    physics_state    (N, T, q) float64       ``physics.get_state()`` at obs_t: ground truth for
                                             evaluation only, never a model input

Storage: ``<cache_dir>/<name>/<key>.npz`` (compressed) and ``<key>.json`` (metadata), written
atomically; ``cache_dir`` defaults to ``~/.cache/pssm/datasets`` (``$XDG_CACHE_HOME`` honoured)
and ``key`` hashes the generation config, so the same call a second time loads the files.
"""

import hashlib
import importlib.metadata
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rl import envs
from rl.replay import atomic_write

FORMAT_VERSION = 1


class DatasetConfig(NamedTuple):
    """What to record (everything that determines the data; hashed into the cache key).

    Attributes:
        task: ``rl.envs`` task name, e.g. ``"cartpole-swingup"``.
        num_sequences: ``N``, one fresh episode each.
        length: ``T`` agent steps per sequence (at most the episode length).
        images: record 64x64 images (rendering dominates the cost); ``False`` for states only.
        variant: an ``rl.envs`` variant (preset name, :class:`rl.envs.Variant` or dict).
        action_repeat: ``None`` for the task default.
        seed: seeds the environment, its variants and the random actions.
        size: image size.
    """

    task: str
    num_sequences: int
    length: int
    images: bool = True
    variant: Any = None
    action_repeat: int | None = None
    seed: int = 0
    size: int = 64


class Dataset(NamedTuple):
    """A loaded data set: ``data`` arrays (module docstring), ``metadata``, the ``.npz`` path,
    and whether it came from the cache."""

    data: dict[str, np.ndarray]
    metadata: dict
    path: Path
    from_cache: bool


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pssm/datasets``, by default ``~/.cache/pssm/datasets``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pssm" / "datasets"


def _variant_json(variant: envs.Variant) -> dict:
    return {k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in variant._asdict().items()}


def content_key(config: DatasetConfig, action_source: str) -> tuple[str, dict]:
    """``(key, canonical config)``: a 16-hex-digit SHA-256 prefix of the canonical config."""
    variant = envs.as_variant(config.variant)
    domain, task = envs.parse_task(config.task)
    repeat = config.action_repeat
    if repeat is None:
        repeat = envs.DEFAULT_ACTION_REPEAT.get(domain, envs.FALLBACK_ACTION_REPEAT)
    canonical = {
        "format_version": FORMAT_VERSION,
        "task": f"{domain}-{task}",
        "num_sequences": int(config.num_sequences),
        "length": int(config.length),
        "images": bool(config.images),
        "variant": _variant_json(variant),
        "action_repeat": int(repeat),
        "seed": int(config.seed),
        "size": int(config.size),
        "actions": action_source,
    }
    text = json.dumps(canonical, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], canonical


def _action_source(actions, policy, policy_id) -> str:
    if actions is not None and policy is not None:
        raise ValueError("give actions or policy, not both")
    if actions is not None:
        a = np.ascontiguousarray(actions, np.float64)
        return "given:" + hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:16]
    if policy is not None:
        if not policy_id:
            raise ValueError("a policy needs a policy_id string naming it in the cache key")
        return f"policy:{policy_id}"
    return "uniform"


def generate(
    config: DatasetConfig,
    *,
    actions: np.ndarray | None = None,
    policy: Callable | None = None,
    policy_id: str | None = None,
    name: str | None = None,
    cache_dir=None,
    overwrite: bool = False,
) -> Dataset:
    """Record a data set, or load it when the same config was recorded before.

    Args:
        config: what to record.
        actions: optional ``(N, T, u)`` actions to execute instead of uniform random ones.
        policy: optional ``policy(timestep, rng) -> action`` (``rng`` a NumPy generator).
        policy_id: names ``policy`` in the cache key (required with ``policy``).
        name: sub-directory of the cache (default: the task name).
        cache_dir: root directory (default :func:`default_cache_dir`).
        overwrite: regenerate even if cached.
    """
    key, canonical = content_key(config, _action_source(actions, policy, policy_id))
    directory = Path(cache_dir or default_cache_dir()) / (name or canonical["task"])
    path = directory / f"{key}.npz"
    if path.exists() and not overwrite:
        return load(path)._replace(from_cache=True)
    start = time.perf_counter()
    data, info = record(config, actions=actions, policy=policy)
    meta = {
        "key": key,
        "config": canonical,
        **info,
        "arrays": {k: [list(v.shape), v.dtype.str] for k, v in data.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - start, 3),
        "versions": {p: _version(p) for p in ("dm_control", "mujoco", "numpy")},
        "time_convention": "actions[n, t] taken at obs t; rewards[n, t] received for it",
    }
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1)
    # metadata first: an existing .npz always has its .json beside it
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text.encode()))
    atomic_write(path, lambda f: np.savez_compressed(f, **data))
    return Dataset(data, json.loads(text), path, False)  # the metadata as load() reads it


def load(path) -> Dataset:
    """Load a data set written by :func:`generate` (``.npz`` path; metadata from ``.json``)."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    expected = {k: (tuple(s), d) for k, (s, d) in meta["arrays"].items()}
    found = {k: (v.shape, v.dtype.str) for k, v in data.items()}
    if expected != found:
        raise ValueError(f"{path}: arrays {found} do not match the metadata {expected}")
    return Dataset(data, meta, path, False)


def record(config: DatasetConfig, *, actions=None, policy=None) -> tuple[dict, dict]:
    """Run the episodes and return ``(arrays, metadata about the environment)``; no caching."""
    N, T = int(config.num_sequences), int(config.length)
    if N < 1 or T < 1:
        raise ValueError(f"need num_sequences >= 1 and length >= 1, got {N}, {T}")
    variant = envs.as_variant(config.variant)
    domain, _ = envs.parse_task(config.task)
    modalities = ("image",) if config.images else ()
    modalities += ("state",) + (("proprio",) if domain in envs.PROPRIO else ())
    env = envs.make(
        config.task,
        obs=modalities,
        variant=variant,
        action_repeat=config.action_repeat,
        seed=config.seed,
        size=config.size,
    )
    if env.episode_length is not None and T > env.episode_length:
        raise ValueError(f"length {T} exceeds the episode length {env.episode_length}")
    u = env.action_dim
    if actions is not None:
        actions = np.asarray(actions, np.float64)
        if actions.shape != (N, T, u):
            raise ValueError(f"actions have shape {actions.shape}, expected {(N, T, u)}")
    rng = np.random.default_rng((config.seed, 100))
    out: dict[str, list] = {k: [] for k in modalities}
    keys = ("mask", "actions", "applied_actions", "rewards", "discounts", "physics_state")
    out.update({k: [] for k in keys})
    if variant.occlusion is not None:
        out["pixel_mask"] = []
    for n in range(N):
        ts = env.reset()
        seq: dict[str, list] = {k: [] for k in out}
        for t in range(T):
            for m in modalities:
                seq[m].append(ts.obs if len(modalities) == 1 else ts.obs[m])
            seq["mask"].append(ts.mask)
            seq["discounts"].append(ts.info["discount"])
            seq["physics_state"].append(env.physics_state())
            if "pixel_mask" in seq:
                seq["pixel_mask"].append(ts.info["pixel_mask"])
            if actions is not None:
                a = actions[n, t]
            elif policy is not None:
                a = policy(ts, rng)
            else:
                a = rng.uniform(env.action_low, env.action_high)
            a = envs.validate_action(a, env.action_low, env.action_high, clip=True)
            nxt = env.step(a)
            seq["actions"].append(a)
            seq["applied_actions"].append(nxt.info["action"])
            seq["rewards"].append(nxt.reward)
            if nxt.done and t < T - 1:
                raise ValueError(f"episode {n} ended after {t + 1} of {T} steps")
            ts = nxt
        for k, v in seq.items():
            out[k].append(np.stack([np.asarray(x) for x in v]))
    dtypes = {"actions": np.float32, "applied_actions": np.float32, "rewards": np.float32}
    dtypes.update(discounts=np.float32, physics_state=np.float64)
    data = {k: np.stack(v) for k, v in out.items()}
    data = {k: v.astype(dtypes.get(k, v.dtype)) for k, v in data.items()}
    info = {
        "modalities": list(modalities),
        "state_layout": env.state_layout,
        "proprio_layout": [list(p) for p in envs.PROPRIO.get(domain, ())],
        "action_low": env.action_low.tolist(),
        "action_high": env.action_high.tolist(),
        "episode_length": env.episode_length,
        "control_timestep": env.control_timestep,
        "physics_state_size": int(data["physics_state"].shape[-1]),
    }
    return data, info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
