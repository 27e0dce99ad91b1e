"""dm_control suite tasks behind the :mod:`rl.envs.core` interface.

One :class:`DMCEnv` wraps one ``dm_control.suite`` environment loaded with its own random state
(``task_kwargs={"random": seed}``: a run is reproducible given the seed, and instances never
share a global RNG, cf. dreamerv3 issue #43). Per agent step it

- validates the action (size, finite) and clips it to the action spec,
- repeats it ``action_repeat`` times (stopping early at the episode end), summing the rewards
  (PlaNet, Hafner et al. 2019),
- returns the requested modalities:
  ``"image"``   ``(size, size, 3)`` uint8 from camera 0 (rendered headless with ``MUJOCO_GL=egl``),
  ``"state"``   float32 vector: the task's observation dict flattened in its spec order
                (:attr:`DMCEnv.state_layout`),
  ``"proprio"`` float32 vector: the task's proprioceptive part (:data:`PROPRIO`, as in the
                sensor-fusion tasks of Becker & Neumann 2022, VRKN), e.g. the cart position of
                cartpole, the cup position of ball_in_cup;
- checks the low-dimensional state for NaN/inf (a diverged simulation raises ``ValueError``).

The episode length in agent steps is ``ceil(step_limit / action_repeat)`` (1000 simulator steps
for every suite task: 125 for cartpole at repeat 8).
"""

import math

import numpy as np

from rl.envs.core import ArraySpec, EpisodeStats, TimeStep, check_finite, validate_action

#: PlaNet's action repeats (Hafner et al., 2019); other domains use :data:`FALLBACK_ACTION_REPEAT`.
DEFAULT_ACTION_REPEAT = {
    "cartpole": 8,
    "finger": 2,
    "cheetah": 4,
    "ball_in_cup": 4,
    "walker": 2,
    "reacher": 4,
}
#: Dreamer's action repeat for every task.
FALLBACK_ACTION_REPEAT = 2

#: Proprioceptive part of a domain's observation dict: ``(key, start, stop)`` pieces, the
#: "proprioceptive position" of the VRKN sensor-fusion tasks (pbecker93/vrkn).
PROPRIO = {
    "cartpole": (("position", 0, 1),),  # cart position; the pole must come from images
    "cheetah": (("position", -6, None),),  # joint angles, no root pose
    "walker": (("orientations", 0, None),),
    "ball_in_cup": (("position", 0, 2),),  # cup position; the ball must come from images
    "reacher": (("position", 0, None),),
    "finger": (("position", 0, 2),),
    "pendulum": (("orientation", 0, None),),
    "hopper": (("position", -4, None), ("touch", 0, None)),
    "manipulator": (("arm_pos", 0, None),),
}

DOMAIN_ALIASES = {"cup": "ball_in_cup"}
MODALITIES = ("image", "state", "proprio")


def parse_task(name: str) -> tuple[str, str]:
    """``"cartpole-swingup"`` / ``"cartpole_swingup"`` / ``"cup-catch"`` -> ``(domain, task)``.

    Raises:
        ValueError: not a dm_control suite task (the message lists the known ones).
    """
    from dm_control import suite

    known = set(suite.ALL_TASKS)
    if "-" in name:
        domain, task = name.split("-", 1)
        domain = DOMAIN_ALIASES.get(domain, domain)
        if (domain, task) in known:
            return domain, task
    else:
        for domain, task in known:
            for d in [domain] + [k for k, v in DOMAIN_ALIASES.items() if v == domain]:
                if name == f"{d}_{task}":
                    return domain, task
    listing = ", ".join(sorted(f"{d}-{t}" for d, t in known))
    raise ValueError(f"unknown dm_control task {name!r}; known tasks: {listing}")


class DMCEnv:
    """A seeded dm_control suite task with action repeat (see the module docstring).

    Args:
        domain, task: suite names, e.g. ``("cartpole", "swingup")``.
        modalities: non-empty tuple from ``("image", "state", "proprio")``; one modality gives
            array observations, several a dict in this order.
        action_repeat: simulator steps per agent step; ``None`` for :data:`DEFAULT_ACTION_REPEAT`.
        seed: seed of the task's random state (initial states, task randomness).
        size: image height and width.
        camera: camera id for images.
        clip_actions: clip out-of-bounds actions (default) or raise ``ValueError``.
    """

    def __init__(
        self,
        domain: str,
        task: str,
        *,
        modalities: tuple[str, ...] = ("image",),
        action_repeat: int | None = None,
        seed: int = 0,
        size: int = 64,
        camera: int = 0,
        clip_actions: bool = True,
    ):
        modalities = tuple(modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct and non-empty, got {modalities}")
        if bad := [m for m in modalities if m not in MODALITIES]:
            raise ValueError(f"unknown modalities {bad}; choose from {MODALITIES}")
        if "proprio" in modalities and domain not in PROPRIO:
            raise ValueError(f"no proprioceptive observation defined for domain {domain!r}")
        if action_repeat is None:
            action_repeat = DEFAULT_ACTION_REPEAT.get(domain, FALLBACK_ACTION_REPEAT)
        if int(action_repeat) != action_repeat or action_repeat < 1:
            raise ValueError(f"action_repeat must be a positive integer, got {action_repeat}")
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size}")
        from dm_control import suite

        self._env = suite.load(domain, task, task_kwargs={"random": int(seed)})
        self.domain, self.task = domain, task
        self.modalities = modalities
        self.action_repeat = int(action_repeat)
        self.seed = int(seed)
        self.size = int(size)
        self.camera = camera
        self.clip_actions = clip_actions
        spec = self._env.action_spec()
        self.action_low = np.asarray(spec.minimum, np.float64).reshape(spec.shape)
        self.action_high = np.asarray(spec.maximum, np.float64).reshape(spec.shape)
        self.action_low.setflags(write=False)
        self.action_high.setflags(write=False)
        self.state_layout = {
            k: int(np.prod(v.shape)) for k, v in self._env.observation_spec().items()
        }
        limit = getattr(self._env, "_step_limit", float("inf"))
        self.episode_length = (
            None if math.isinf(limit) else math.ceil(round(limit) / self.action_repeat)
        )
        self.last_episode: EpisodeStats | None = None
        self.variant = None  # set by rl.envs.make
        self._running = False
        self._return = 0.0
        self._length = 0

    # ----------------------------------------------------------------------------- specs
    @property
    def name(self) -> str:
        return f"{self.domain}-{self.task}"

    @property
    def action_dim(self) -> int:
        return int(self.action_low.size)

    @property
    def observation_spec(self) -> ArraySpec | dict[str, ArraySpec]:
        sizes = {
            "image": ArraySpec((self.size, self.size, 3), np.dtype(np.uint8)),
            "state": ArraySpec((sum(self.state_layout.values()),), np.dtype(np.float32)),
            "proprio": ArraySpec((self._proprio_size(),), np.dtype(np.float32)),
        }
        if len(self.modalities) == 1:
            return sizes[self.modalities[0]]
        return {m: sizes[m] for m in self.modalities}

    @property
    def observation_shape(self) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        spec = self.observation_spec
        if isinstance(spec, dict):
            return {k: v.shape for k, v in spec.items()}
        return spec.shape

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return () if len(self.modalities) == 1 else (len(self.modalities),)

    @property
    def control_timestep(self) -> float:
        """Seconds of simulated time per agent step."""
        return self._env.control_timestep() * self.action_repeat

    @property
    def physics(self):
        """The MuJoCo physics (for ground truth and rendering; agents must not read it)."""
        return self._env.physics

    @property
    def unwrapped(self) -> "DMCEnv":
        return self

    def physics_state(self) -> np.ndarray:
        """Ground-truth simulator state ``physics.get_state()`` (qpos, qvel, act), float64."""
        return np.array(self._env.physics.get_state(), dtype=np.float64)

    def render(self, size: int | None = None) -> np.ndarray:
        """``(size, size, 3)`` uint8 image of the current state from the env's camera."""
        s = self.size if size is None else size
        return self._env.physics.render(height=s, width=s, camera_id=self.camera)

    # ----------------------------------------------------------------------------- dynamics
    def reset(self) -> TimeStep:
        ts = self._env.reset()
        self._running = True
        self._return, self._length = 0.0, 0
        obs, mask = self._observe(ts.observation, render=True)
        return TimeStep(obs, 0.0, False, mask, {"discount": 1.0, "action": None})

    def step(self, action, *, render: bool = True) -> TimeStep:
        """One agent step: ``action_repeat`` simulator steps with ``action``, rewards summed.

        ``render=False`` skips rendering; the image is then zeros (see :class:`Wrapper`).
        """
        if not self._running:
            raise ValueError("the episode is over (or never started): call reset() first")
        a = validate_action(action, self.action_low, self.action_high, clip=self.clip_actions)
        reward = 0.0
        for _ in range(self.action_repeat):
            ts = self._env.step(a)
            reward += float(ts.reward or 0.0)
            if ts.last():
                break
        obs, mask = self._observe(ts.observation, render=render)
        self._return += reward
        self._length += 1
        done = bool(ts.last())
        info = {"discount": float(ts.discount), "action": a}
        if done:
            self._running = False
            self.last_episode = EpisodeStats(self._return, self._length)
            info["episode"] = self.last_episode
        return TimeStep(obs, reward, done, mask, info)

    # ----------------------------------------------------------------------------- helpers
    def _proprio_size(self) -> int:
        if self.domain not in PROPRIO:
            return 0
        dummy = {k: np.zeros(n) for k, n in self.state_layout.items()}
        return int(self._proprio(dummy).size)

    def _proprio(self, observation) -> np.ndarray:
        parts = [np.ravel(observation[k])[lo:hi] for k, lo, hi in PROPRIO[self.domain]]
        return np.concatenate(parts).astype(np.float32)

    def _observe(self, observation, *, render: bool):
        parts = {}
        if "state" in self.modalities:
            flat = np.concatenate([np.ravel(observation[k]) for k in self.state_layout])
            parts["state"] = check_finite("state observation", flat.astype(np.float32))
        else:
            check_finite("physics state", self._env.physics.get_state())
        if "proprio" in self.modalities:
            parts["proprio"] = check_finite("proprio observation", self._proprio(observation))
        if "image" in self.modalities:
            if render:
                parts["image"] = self.render()
            else:
                parts["image"] = np.zeros((self.size, self.size, 3), np.uint8)
        if len(self.modalities) == 1:
            return parts[self.modalities[0]], np.ones((), bool)
        return {m: parts[m] for m in self.modalities}, np.ones(len(self.modalities), bool)

    def __repr__(self) -> str:
        return (
            f"DMCEnv({self.name}, modalities={self.modalities}, "
            f"action_repeat={self.action_repeat}, seed={self.seed})"
        )
