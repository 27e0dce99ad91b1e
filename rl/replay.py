"""Sequence replay of episodes, saved and restored with nothing lost.

Storage convention (the time convention of :mod:`rl.world_model` and :mod:`rl.envs`): row ``t``
of an episode holds

    obs_t        the observation (an array, or a dict of arrays in a fixed key order)
    action_t     the action taken at obs_t
    reward_t     the reward received for action_t
    mask_t       per-modality observation flags (shape () or (K,), bool)
    discount_t   0.0 if obs_t is terminal, else 1.0 (the env's ``info["discount"]``)
    pixel_mask_t optional: per-pixel flags (H, W) of the image of obs_t, True where the scene
                 is visible (the occlusion variant's ``info["pixel_mask"]``; stored as packed
                 bits, ``H * ceil(W / 8)`` bytes a row, and returned as booleans)

An episode of ``N`` actions therefore has ``N + 1`` rows; the last row carries the final
observation with a zero action and zero reward (unscored by the world models). A runner adds::

    ts = env.reset()
    while not ts.done:
        a = policy(ts.obs)
        nxt = env.step(a)
        replay.add(ts.obs, a, nxt.reward, ts.mask, ts.info["discount"],
                   pixel_mask=ts.info.get("pixel_mask"))
        ts = nxt
    replay.add(ts.obs, np.zeros(u), 0.0, ts.mask, ts.info["discount"], last=True,
               pixel_mask=ts.info.get("pixel_mask"))

Either every row of a replay has a pixel mask or none has (the first row fixes the layout).

Sampling (NumPy generator owned by the replay, its state saved with the data):

- :meth:`Replay.sample_sequences`: ``B`` windows of ``T`` consecutive rows, uniform over all
  ``(episode, start)`` pairs of the stored (completed, and optionally the ongoing) episodes,
  so every stored row of a long episode is equally likely to appear;
- :meth:`Replay.sample_transitions`: ``(obs_t, a_t, r_t, obs_{t+1}, discount_{t+1})`` uniform
  over all rows that have a successor (SAC's targets are ``r_t + gamma d_{t+1} V(obs_{t+1})``).

Capacity is counted in rows; whenever the total exceeds it, the oldest *completed* episodes are
evicted (the newest episode, ongoing or just completed, never is, even when it alone exceeds
the capacity). :meth:`Replay.save` writes one ``.npz`` (data plus the JSON
metadata inside it, written to a temporary file and renamed, so a crash never leaves a torn
file) and a human-readable ``.json`` beside it; :meth:`Replay.load` restores data, ongoing
episode, counters and generator state, so sampling after a reload equals sampling without one.
"""

import itertools
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT_VERSION = 1
_SEP = "."  # flattened field names: "obs", "obs.image", "action", ...


class Sequences(NamedTuple):
    """``B`` windows of ``T`` rows; every array has leading axes ``(B, T)``.

    ``episode`` ``(B,)`` holds the episodes' ids (counting every episode ever added, from 0)
    and ``start`` ``(B,)`` the first row of each window; ``pixel_mask`` ``(B, T, H, W)`` bool
    the stored per-pixel masks of the image (``None`` when the replay holds none).
    """

    obs: Any
    actions: np.ndarray
    rewards: np.ndarray
    mask: np.ndarray
    discounts: np.ndarray
    episode: np.ndarray
    start: np.ndarray
    pixel_mask: np.ndarray | None = None

    def model_batch(self, dtype=None) -> dict:
        """``{"obs", "actions", "rewards", "mask"}``: the batch a world model trains on, with
        actions, rewards and non-image observations cast to ``dtype`` when given (JAX's default
        float; ``uint8`` images stay as they are, the models map them); with stored pixel masks
        also ``"pixel_mask"`` (the models' per-pixel likelihood masks,
        :func:`pssm.inputs.gaussian_observations`: an array for image observations, else
        ``{"image": mask}``)."""
        batch = {"obs": self.obs, "actions": self.actions, "rewards": self.rewards,
                 "mask": self.mask}  # fmt: skip
        if self.pixel_mask is not None:
            pm = self.pixel_mask
            batch["pixel_mask"] = {"image": pm} if isinstance(self.obs, Mapping) else pm
        if dtype is None:
            return batch
        batch["actions"] = batch["actions"].astype(dtype)
        batch["rewards"] = batch["rewards"].astype(dtype)
        if not isinstance(batch["obs"], Mapping):
            o = batch["obs"]
            batch["obs"] = o if o.dtype == np.uint8 else o.astype(dtype)
        return batch


class Transitions(NamedTuple):
    """``B`` single transitions; ``discounts`` is ``discount_{t+1}``."""

    obs: Any
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: Any
    discounts: np.ndarray
    mask: np.ndarray
    next_mask: np.ndarray


class _Growing:
    """Row storage for the ongoing episode: preallocated arrays that double when full."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], str]], capacity: int = 64):
        self.spec = spec
        self.n = 0
        self.data = {k: np.zeros((capacity, *s), d) for k, (s, d) in spec.items()}

    def append(self, row: dict[str, np.ndarray]) -> None:
        cap = len(next(iter(self.data.values())))
        if self.n == cap:
            self.data = {
                k: np.concatenate([v, np.zeros_like(v)], axis=0) for k, v in self.data.items()
            }
        for k, v in row.items():
            self.data[k][self.n] = v
        self.n += 1

    def view(self) -> dict[str, np.ndarray]:
        return {k: v[: self.n] for k, v in self.data.items()}


def _flatten_obs(obs) -> dict[str, np.ndarray]:
    if isinstance(obs, dict):
        return {f"obs{_SEP}{k}": np.asarray(v) for k, v in obs.items()}
    return {"obs": np.asarray(obs)}


class Replay:
    """Episode replay (see the module docstring).

    Args:
        capacity: maximum number of stored rows (oldest completed episodes are evicted).
        seed: seed of the sampling generator.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity}")
        self.capacity = int(capacity)
        self.rng = np.random.default_rng(seed)
        self._spec: dict[str, tuple[tuple[int, ...], str]] | None = None
        self._obs_keys: list[str] | None = None  # None: array observations
        self._pixel_width: int | None = None  # W of stored pixel masks (None: none stored)
        self._episodes: list[dict[str, np.ndarray]] = []
        self._ids: list[int] = []
        self._current: _Growing | None = None
        self._next_id = 0
        self._done_rows = 0
        self.total_rows_added = 0

    # ----------------------------------------------------------------------------- sizes
    @property
    def num_rows(self) -> int:
        """Rows stored, the ongoing episode included."""
        return self._done_rows + (self._current.n if self._current is not None else 0)

    @property
    def num_episodes(self) -> int:
        """Completed episodes stored."""
        return len(self._episodes)

    @property
    def episode_ids(self) -> list[int]:
        """Ids of the stored completed episodes, oldest first."""
        return list(self._ids)

    @property
    def ongoing_length(self) -> int:
        return self._current.n if self._current is not None else 0

    def episode(self, i: int) -> dict[str, Any]:
        """The ``i``-th stored completed episode as ``{"obs", "actions", ...}`` (views)."""
        return self._unflatten(self._episodes[i])

    # ----------------------------------------------------------------------------- adding
    def _row(self, obs, action, reward, mask, discount, pixel_mask) -> dict[str, np.ndarray]:
        row = _flatten_obs(obs)
        row["action"] = np.asarray(action, np.float32).reshape(-1)
        row["reward"] = np.asarray(reward, np.float32)
        row["discount"] = np.asarray(discount, np.float32)
        if mask is None:
            mask = np.ones(() if not isinstance(obs, dict) else (len(obs),), bool)
        row["mask"] = np.asarray(mask, bool)
        if pixel_mask is not None:
            pm = np.asarray(pixel_mask)
            image = obs.get("image") if isinstance(obs, dict) else row["obs"]
            if image is None or pm.shape != np.shape(image)[:2] or np.ndim(image) != 3:
                raise ValueError(f"pixel_mask has shape {pm.shape}: expected (H, W) of an "
                                 "(H, W, C) image observation")  # fmt: skip
            if pm.dtype != bool and not np.isin(pm, (0, 1)).all():
                raise ValueError("pixel_mask must be boolean or 0/1")
            row["pixel_mask"] = np.packbits(pm.astype(bool), axis=-1)
        spec = self._spec or {k: (v.shape, v.dtype.str) for k, v in row.items()}
        if set(row) != set(spec):
            raise ValueError(f"row has fields {sorted(row)}, the replay holds {sorted(spec)}")
        for k, v in row.items():
            shape, dtype = spec[k]
            if v.shape != shape:
                raise ValueError(f"{k} has shape {v.shape}, the replay stores {shape}")
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                raise ValueError(f"{k} has non-finite entries")
            if np.dtype(dtype).kind in "iub" and v.dtype.kind == "f":
                raise ValueError(f"{k} is float, the replay stores {np.dtype(dtype)}")
        if row["reward"].shape != () or row["discount"].shape != ():
            raise ValueError("reward and discount must be scalars")
        if self._spec is None:  # the first valid row fixes the layout
            self._spec = spec
            self._obs_keys = list(obs) if isinstance(obs, dict) else None
            self._pixel_width = None if pixel_mask is None else np.shape(pixel_mask)[1]
        return row

    def add(
        self, obs, action, reward, mask=None, discount=1.0, last: bool = False, pixel_mask=None
    ) -> None:
        """Append row ``t`` of the ongoing episode; ``last=True`` completes the episode.

        ``mask=None`` means every modality is observed; ``pixel_mask`` ``(H, W)`` flags the
        visible pixels of the image (module docstring).
        """
        row = self._row(obs, action, reward, mask, discount, pixel_mask)
        if self._current is None:
            self._current = _Growing(self._spec)
        self._current.append(row)
        self.total_rows_added += 1
        if last:
            episode = {k: v.copy() for k, v in self._current.view().items()}
            self._episodes.append(episode)
            self._ids.append(self._next_id)
            self._next_id += 1
            self._done_rows += len(episode["reward"])
            self._current = None
        self._evict()

    def add_episode(
        self, obs, actions, rewards, mask=None, discounts=None, pixel_mask=None
    ) -> None:
        """Append a whole completed episode of ``L`` rows (arrays with leading axis ``L``)."""
        if self._current is not None:
            raise ValueError("an episode is in progress: finish it with add(..., last=True)")
        L = len(rewards)
        if L < 1:
            raise ValueError("an episode needs at least one row")
        for t in range(L):
            o = {k: v[t] for k, v in obs.items()} if isinstance(obs, dict) else obs[t]
            self.add(
                o,
                actions[t],
                rewards[t],
                None if mask is None else mask[t],
                1.0 if discounts is None else discounts[t],
                last=t == L - 1,
                pixel_mask=None if pixel_mask is None else pixel_mask[t],
            )

    def _evict(self) -> None:
        keep = 0 if self._current is not None else 1  # the newest episode always stays
        while len(self._episodes) > keep and self.num_rows > self.capacity:
            self._done_rows -= len(self._episodes.pop(0)["reward"])
            self._ids.pop(0)

    # ----------------------------------------------------------------------------- sampling
    def _sources(self, include_ongoing: bool):
        sources, ids = list(self._episodes), list(self._ids)
        if include_ongoing and self._current is not None and self._current.n > 0:
            sources.append(self._current.view())
            ids.append(self._next_id)
        return sources, ids

    def _draw(self, counts: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Uniform draws over all ``(source, offset)`` with ``offset < counts[source]``."""
        cum = np.cumsum(counts)
        u = self.rng.integers(cum[-1], size=batch_size)
        src = np.searchsorted(cum, u, side="right")
        return src, u - (cum[src] - counts[src])

    def _unflatten(self, flat: dict[str, np.ndarray]) -> dict[str, Any]:
        if self._obs_keys is None:
            obs = flat["obs"]
        else:
            obs = {k: flat[f"obs{_SEP}{k}"] for k in self._obs_keys}
        out = {
            "obs": obs,
            "actions": flat["action"],
            "rewards": flat["reward"],
            "mask": flat["mask"],
            "discounts": flat["discount"],
        }
        if "pixel_mask" in flat:
            bits = np.unpackbits(flat["pixel_mask"], axis=-1, count=self._pixel_width)
            out["pixel_mask"] = bits.astype(bool)
        return out

    def _gather(self, sources, src, start, length: int | None = None) -> dict[str, Any]:
        """Rows ``start`` (``length=None``) or windows ``start:start+length`` of the sources."""
        pairs = list(zip(src, start, strict=True))
        if length is None:
            flat = {k: np.stack([sources[i][k][s] for i, s in pairs]) for k in self._spec}
        else:
            flat = {
                k: np.stack([sources[i][k][s : s + length] for i, s in pairs]) for k in self._spec
            }
        return self._unflatten(flat)

    def sample_sequences(
        self, batch_size: int, length: int, *, include_ongoing: bool = False
    ) -> Sequences:
        """``batch_size`` uniform windows of ``length`` consecutive rows (module docstring).

        Raises:
            ValueError: no stored episode has ``length`` rows.
        """
        sources, ids = self._sources(include_ongoing)
        counts = np.array([max(len(s["reward"]) - length + 1, 0) for s in sources], np.int64)
        if length < 1 or counts.sum() == 0:
            longest = max((len(s["reward"]) for s in sources), default=0)
            raise ValueError(f"no stored episode holds {length} rows (longest: {longest})")
        src, start = self._draw(counts, batch_size)
        out = self._gather(sources, src, start, length)
        return Sequences(**out, episode=np.asarray(ids)[src], start=start)

    def sample_transitions(self, batch_size: int, *, include_ongoing: bool = False) -> Transitions:
        """``batch_size`` uniform transitions ``(obs_t, a_t, r_t, obs_{t+1}, discount_{t+1})``.

        Raises:
            ValueError: no stored episode has two rows.
        """
        sources, _ = self._sources(include_ongoing)
        counts = np.array([max(len(s["reward"]) - 1, 0) for s in sources], np.int64)
        if counts.sum() == 0:
            raise ValueError("no stored episode holds a transition (two rows)")
        src, t = self._draw(counts, batch_size)
        now, nxt = (self._gather(sources, src, t + dt) for dt in (0, 1))
        return Transitions(  # pixel masks train world models, not SAC: not returned
            obs=now["obs"],
            actions=now["actions"],
            rewards=now["rewards"],
            next_obs=nxt["obs"],
            discounts=nxt["discounts"],
            mask=now["mask"],
            next_mask=nxt["mask"],
        )

    # ----------------------------------------------------------------------------- persistence
    def metadata(self) -> dict:
        """Everything but the arrays, as JSON-serialisable values."""
        return {
            "format_version": FORMAT_VERSION,
            "capacity": self.capacity,
            "spec": None
            if self._spec is None
            else {k: [list(s), d] for k, (s, d) in self._spec.items()},
            "obs_keys": self._obs_keys,
            "pixel_width": self._pixel_width,
            "episode_lengths": [len(e["reward"]) for e in self._episodes],
            "episode_ids": self._ids,
            "ongoing_length": self.ongoing_length,
            "next_episode_id": self._next_id,
            "total_rows_added": self.total_rows_added,
            "rng_state": self.rng.bit_generator.state,
        }

    def save(self, path) -> Path:
        """Write ``path`` (``.npz`` appended if missing) and a ``.json`` of its metadata.

        Both are written to temporary files in the target directory and renamed into place.
        Returns the ``.npz`` path.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        arrays = {"__meta__": np.array(json.dumps(meta))}
        for k, (shape, dtype) in (self._spec or {}).items():
            done = [e[k] for e in self._episodes]
            arrays[f"done{_SEP}{k}"] = (
                np.concatenate(done) if done else np.zeros((0, *shape), dtype)
            )
            cur = self._current.view()[k] if self._current is not None else None
            arrays[f"ongoing{_SEP}{k}"] = cur if cur is not None else np.zeros((0, *shape), dtype)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        text = json.dumps(meta, indent=1).encode()
        atomic_write(path.with_suffix(".json"), lambda f: f.write(text))
        return path

    @classmethod
    def load(cls, path) -> "Replay":
        """Restore a replay written by :meth:`save` (metadata read from the ``.npz`` itself)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported replay format {meta.get('format_version')}")
            replay = cls(meta["capacity"])
            replay.rng.bit_generator.state = meta["rng_state"]
            replay._next_id = meta["next_episode_id"]
            replay.total_rows_added = meta["total_rows_added"]
            replay._obs_keys = meta["obs_keys"]
            replay._pixel_width = meta.get("pixel_width")  # absent in files without masks
            if meta["spec"] is None:
                return replay
            replay._spec = {k: (tuple(s), d) for k, (s, d) in meta["spec"].items()}
            done = {k: data[f"done{_SEP}{k}"] for k in replay._spec}
            edges = np.cumsum([0, *meta["episode_lengths"]])
            replay._episodes = [
                {k: v[a:b].copy() for k, v in done.items()} for a, b in itertools.pairwise(edges)
            ]
            replay._ids = list(meta["episode_ids"])
            replay._done_rows = int(edges[-1])
            if meta["ongoing_length"] > 0:
                replay._current = _Growing(replay._spec, max(64, meta["ongoing_length"]))
                for k in replay._spec:
                    replay._current.data[k][: meta["ongoing_length"]] = data[f"ongoing{_SEP}{k}"]
                replay._current.n = meta["ongoing_length"]
        return replay


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
