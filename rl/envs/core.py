"""The environment interface: time steps, specs, action checks and the wrapper base.

An environment is a small stateful object (MuJoCo physics is state) with two calls::

    ts = env.reset()          # TimeStep(obs_0, reward=0.0, done=False, mask_0, info)
    ts = env.step(a_0)        # TimeStep(obs_1, r_0, done, mask_1, info)

so ``ts.reward`` of ``step(a_t)`` is the reward *for* ``a_t`` (summed over the action repeat),
the time convention of :mod:`rl.world_model` and :mod:`rl.replay`. ``obs`` is one array (a single
modality) or a dict of arrays (several, in a fixed key order); ``mask`` is a boolean flag per
modality in that order (shape ``()`` for one modality, ``(K,)`` for ``K``), ``False`` where the
modality is absent this step (its array is then zeros). ``info`` always holds

- ``"discount"``: ``0.0`` on arrival in a terminal state, else ``1.0`` (time-limit ends keep 1),
- ``"action"``: the action the simulator executed (after clipping and any transition noise),
  ``None`` after ``reset``,

and on the last step of an episode ``"episode"``: its :class:`EpisodeStats`. Variants add
entries of their own (``"pixel_mask"`` for occlusions, ...).
"""

from typing import Any, NamedTuple

import numpy as np

Obs = np.ndarray | dict[str, np.ndarray]


class TimeStep(NamedTuple):
    """One agent step as the runner sees it (see the module docstring)."""

    obs: Obs
    reward: float
    done: bool
    mask: np.ndarray
    info: dict[str, Any]


class EpisodeStats(NamedTuple):
    """Undiscounted return and length (in agent steps) of a finished episode."""

    episode_return: float
    length: int


class ArraySpec(NamedTuple):
    """Shape and dtype of one observation array."""

    shape: tuple[int, ...]
    dtype: np.dtype


def validate_action(action, low: np.ndarray, high: np.ndarray, *, clip: bool = True) -> np.ndarray:
    """Check an action against the bounds ``[low, high]`` and return it as float64.

    Args:
        action: array-like with ``low.size`` entries (a scalar is accepted for 1-d actions).
        low, high: bounds of the action spec, shape ``(u,)``.
        clip: clip out-of-bounds entries (the default, for exploration noise); ``False`` raises.

    Raises:
        ValueError: wrong size, non-numeric or non-finite entries, or out of bounds with
            ``clip=False``.
    """
    try:
        a = np.asarray(action, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"action must be numeric, got {action!r}") from err
    if a.shape != low.shape:
        if a.ndim > 1 or a.size != low.size:
            raise ValueError(f"action has shape {a.shape}, expected {low.shape}")
        a = a.reshape(low.shape)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action has non-finite entries: {a}")
    if clip:
        return np.clip(a, low, high)
    if np.any(a < low) or np.any(a > high):
        raise ValueError(f"action {a} is outside the action bounds [{low}, {high}]")
    return a


def check_finite(name: str, x: np.ndarray) -> np.ndarray:
    """Return ``x``; raise a ``ValueError`` naming ``name`` if it holds NaN or inf."""
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(np.asarray(x)))
        raise ValueError(
            f"{name} has non-finite entries at flat indices {bad[:10].tolist()} "
            "(the simulation may have diverged)"
        )
    return x


def get_image(obs: Obs) -> np.ndarray | None:
    """The image of an observation: the array itself if it is ``uint8`` ``(H, W, 3)``, else
    ``obs["image"]``; ``None`` when there is none."""
    if isinstance(obs, dict):
        return obs.get("image")
    return obs if obs.dtype == np.uint8 and obs.ndim == 3 else None


def replace_image(obs: Obs, image: np.ndarray) -> Obs:
    """``obs`` with its image replaced (a new dict; arrays are not copied)."""
    if isinstance(obs, dict):
        return {**obs, "image": image}
    return image


class Wrapper:
    """Base of the variants: forwards everything to the wrapped ``env``.

    Subclasses override ``reset`` and ``step(action, *, render=True)``. ``render=False`` lets
    an outer wrapper tell the base environment that this step's image will be discarded, so it
    is not rendered (rendering dominates the cost of pixel environments).
    """

    def __init__(self, env):
        self.env = env

    def reset(self) -> TimeStep:
        return self.env.reset()

    def step(self, action, *, render: bool = True) -> TimeStep:
        return self.env.step(action, render=render)

    @property
    def unwrapped(self):
        return self.env.unwrapped

    def __getattr__(self, name):
        # only called for attributes not found on the wrapper itself
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env!r})"
