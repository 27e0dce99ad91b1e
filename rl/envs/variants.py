"""Harder variants of the tasks, as composable wrappers.

From Becker & Neumann (2022, VRKN, Sec. 4.2-4.3) and Becker et al. (2024, KalMamba, App. D.2):

- **transition noise** (:class:`TransitionNoise`): the simulator executes
  ``clip(a_t + eps_t, low, high)``, ``eps_t ~ N(0, sigma^2 I)`` drawn once per agent step inside
  the environment; agent, world model and replay only ever see ``a_t``
  (``info["action"]`` holds the executed action, ``info["agent_action"]`` ``a_t``).
- **observation noise** (:class:`ObservationNoise`): ``o_t + N(0, sigma^2 I)`` on every
  low-dimensional (float) modality (``"state"``, ``"proprio"``); images are untouched.
  KalMamba's noisy state tasks use ``sigma = 0.3`` for both noises (preset ``"noisy"``).
- **occlusions** (:class:`Occluded`): slow-moving opaque discs drawn over the image, bouncing
  off its borders, re-drawn at each reset; ``info["pixel_mask"]`` ``(H, W)`` bool is ``True``
  where the scene is visible (the runner keeps it in replay with each step and the world
  models' image likelihoods score only those pixels, VRKN Sec. 4.2; :mod:`rl.replay`,
  :func:`pssm.inputs.gaussian_observations`) and ``info["clean_image"]`` is
  the image before occlusion (ground truth for evaluation only). VRKN replays pre-recorded
  disc videos that are not public; the disc count, sizes and speeds of :class:`Occlusion` are
  this project's choice.
- **sensor fusion** (:class:`SensorFusion`): the image only every ``n``-th step,
  ``n ~ U{min_gap, ..., max_gap}`` (4..8 in VRKN) drawn per gap (or once per episode), the
  low-dimensional modalities every step; the first image of an episode is at its reset. On
  steps without an image it is zeros, its mask flag ``False`` and it is not rendered (so also
  ``info["pixel_mask"]`` of an occluded variant means nothing there).

Every wrapper owns a NumPy generator seeded from ``(env seed, stream id)``: a variant is
reproducible given the seed and draws nothing from the simulator's random state, so a variant
with zero noise reproduces the base environment exactly.
"""

from typing import NamedTuple

import numpy as np

from rl.envs.core import TimeStep, Wrapper, get_image, replace_image, validate_action


class Occlusion(NamedTuple):
    """Occluding discs. Lengths are fractions of the image size.

    Attributes:
        num_discs: discs per image.
        radius: ``(low, high)`` of the uniform radius distribution.
        speed: ``(low, high)`` of the uniform speed distribution, per agent step.
    """

    num_discs: int = 4
    radius: tuple[float, float] = (0.12, 0.25)
    speed: tuple[float, float] = (0.008, 0.03)


class Fusion(NamedTuple):
    """Images every ``n``-th step, ``n ~ U{min_gap..max_gap}`` per gap (or once per episode)."""

    min_gap: int = 4
    max_gap: int = 8
    per_episode: bool = False


class Variant(NamedTuple):
    """A task variant; the default is the plain task.

    Attributes:
        transition_noise: std of the Gaussian noise added to executed actions.
        observation_noise: std of the Gaussian noise added to low-dimensional observations.
        occlusion: :class:`Occlusion` discs over the images, or ``None``.
        fusion: :class:`Fusion` image subsampling, or ``None``.
    """

    transition_noise: float = 0.0
    observation_noise: float = 0.0
    occlusion: Occlusion | None = None
    fusion: Fusion | None = None


#: Named presets for ``rl.envs.make(..., variant=name)``.
VARIANTS = {
    "plain": Variant(),
    "noisy": Variant(transition_noise=0.3, observation_noise=0.3),  # KalMamba App. D.2
    "occlusion": Variant(occlusion=Occlusion()),  # VRKN Sec. 4.2 (add transition_noise)
    "fusion": Variant(fusion=Fusion()),  # VRKN Sec. 4.3
}

# stream ids of the wrappers' generators: rng = default_rng((seed, stream))
_TRANSITION, _OBSERVATION, _OCCLUSION, _FUSION = 1, 2, 3, 4


def as_variant(variant) -> Variant:
    """``None``, a preset name, a :class:`Variant` or a dict of its fields -> :class:`Variant`.

    In a dict, ``occlusion=True`` / ``fusion=True`` select the default :class:`Occlusion` /
    :class:`Fusion`, and dicts of their fields are accepted.
    """
    if variant is None:
        return Variant()
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; presets: {sorted(VARIANTS)}")
        return VARIANTS[variant]
    if isinstance(variant, dict):
        if bad := set(variant) - set(Variant._fields):
            raise ValueError(f"unknown variant fields {sorted(bad)}; fields: {Variant._fields}")
        variant = Variant(**variant)
    if not isinstance(variant, Variant):
        raise ValueError(f"variant must be None, a name, a Variant or a dict, got {variant!r}")
    fields = {"occlusion": Occlusion, "fusion": Fusion}
    for name, cls in fields.items():
        value = getattr(variant, name)
        if value is True:
            variant = variant._replace(**{name: cls()})
        elif value is False:
            variant = variant._replace(**{name: None})
        elif isinstance(value, dict):
            variant = variant._replace(**{name: cls(**value)})
    for name in ("transition_noise", "observation_noise"):
        value = getattr(variant, name)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite std >= 0, got {value}")
    if (occ := variant.occlusion) is not None:
        if occ.num_discs < 0 or not 0 <= occ.radius[0] <= occ.radius[1]:
            raise ValueError(f"invalid occlusion {occ}")
        if not 0 <= occ.speed[0] <= occ.speed[1]:
            raise ValueError(f"invalid occlusion speed {occ.speed}")
    if (fus := variant.fusion) is not None and not 1 <= fus.min_gap <= fus.max_gap:
        raise ValueError(f"fusion needs 1 <= min_gap <= max_gap, got {fus}")
    return variant


class TransitionNoise(Wrapper):
    """Executes ``clip(a + N(0, sigma^2 I))`` (see the module docstring)."""

    def __init__(self, env, sigma: float, seed: int):
        super().__init__(env)
        self.sigma = float(sigma)
        self._rng = np.random.default_rng((seed, _TRANSITION))

    def step(self, action, *, render: bool = True) -> TimeStep:
        low, high = self.env.action_low, self.env.action_high
        a = validate_action(action, low, high, clip=self.env.clip_actions)
        noisy = np.clip(a + self.sigma * self._rng.standard_normal(a.shape), low, high)
        ts = self.env.step(noisy, render=render)
        ts.info["agent_action"] = a
        return ts


class ObservationNoise(Wrapper):
    """Adds ``N(0, sigma^2 I)`` to every float (low-dimensional) observation."""

    def __init__(self, env, sigma: float, seed: int):
        super().__init__(env)
        self.sigma = float(sigma)
        self._rng = np.random.default_rng((seed, _OBSERVATION))

    def _noisy(self, x: np.ndarray) -> np.ndarray:
        if x.dtype.kind != "f":
            return x
        return (x + self.sigma * self._rng.standard_normal(x.shape)).astype(x.dtype)

    def _apply(self, ts: TimeStep) -> TimeStep:
        if isinstance(ts.obs, dict):
            obs = {k: self._noisy(v) for k, v in ts.obs.items()}
        else:
            obs = self._noisy(ts.obs)
        return ts._replace(obs=obs)

    def reset(self) -> TimeStep:
        return self._apply(self.env.reset())

    def step(self, action, *, render: bool = True) -> TimeStep:
        return self._apply(self.env.step(action, render=render))


class Occluded(Wrapper):
    """Draws slow-moving opaque discs over the image (see the module docstring)."""

    def __init__(self, env, config: Occlusion, seed: int):
        super().__init__(env)
        spec = env.observation_spec
        if isinstance(spec, dict):
            has_image = "image" in spec
        else:
            has_image = spec.dtype == np.uint8 and len(spec.shape) == 3
        if not has_image:
            raise ValueError(f"occlusion needs an image observation, got {spec}")
        self.config = config
        self._rng = np.random.default_rng((seed, _OCCLUSION))
        size = env.size
        self._yy, self._xx = np.mgrid[0:size, 0:size].astype(np.float64)
        self._center = self._velocity = self._radius = self._color = None

    def _new_discs(self) -> None:
        c, n, size = self.config, self.config.num_discs, self.env.size
        rng = self._rng
        self._center = rng.uniform(0.0, size - 1.0, (n, 2))
        self._radius = size * rng.uniform(*c.radius, n)
        angle = rng.uniform(0.0, 2 * np.pi, n)
        speed = size * rng.uniform(*c.speed, n)
        self._velocity = speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        self._color = rng.integers(0, 256, (n, 3), dtype=np.uint8)

    def _move(self) -> None:
        hi = self.env.size - 1.0
        p = self._center + self._velocity
        low, high = p < 0.0, p > hi  # bounce off the borders
        p = np.where(low, -p, np.where(high, 2 * hi - p, p))
        self._velocity = np.where(low | high, -self._velocity, self._velocity)
        self._center = np.clip(p, 0.0, hi)

    def occlude(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(occluded image, pixel mask)`` for the current discs (later discs on top)."""
        out = image.copy()
        visible = np.ones(image.shape[:2], bool)
        for (cy, cx), r, color in zip(self._center, self._radius, self._color, strict=True):
            inside = (self._yy - cy) ** 2 + (self._xx - cx) ** 2 <= r * r
            out[inside] = color
            visible &= ~inside
        return out, visible

    def _apply(self, ts: TimeStep) -> TimeStep:
        clean = get_image(ts.obs)
        image, visible = self.occlude(clean)
        ts.info["pixel_mask"] = visible
        ts.info["clean_image"] = clean
        return ts._replace(obs=replace_image(ts.obs, image))

    def reset(self) -> TimeStep:
        self._new_discs()
        return self._apply(self.env.reset())

    def step(self, action, *, render: bool = True) -> TimeStep:
        ts = self.env.step(action, render=render)
        self._move()
        return self._apply(ts)


class SensorFusion(Wrapper):
    """Images only every ``n``-th step, other modalities every step (module docstring)."""

    def __init__(self, env, config: Fusion, seed: int):
        super().__init__(env)
        spec = env.observation_spec
        if not isinstance(spec, dict) or "image" not in spec or len(spec) < 2:
            raise ValueError(
                "sensor fusion needs a dict observation with an 'image' and at least one other "
                f"modality, got {spec}"
            )
        self.config = config
        self._image_index = list(spec).index("image")
        self._rng = np.random.default_rng((seed, _FUSION))
        self._t = self._next_image = self._gap = 0

    def _draw_gap(self) -> int:
        return int(self._rng.integers(self.config.min_gap, self.config.max_gap + 1))

    def reset(self) -> TimeStep:
        self._t = 0
        self._gap = self._draw_gap()
        self._next_image = self._gap
        return self.env.reset()

    def step(self, action, *, render: bool = True) -> TimeStep:
        self._t += 1
        present = self._t == self._next_image
        if present:
            self._next_image += self._gap if self.config.per_episode else self._draw_gap()
        ts = self.env.step(action, render=render and present)
        if present:
            return ts
        mask = ts.mask.copy()
        mask[self._image_index] = False
        image = np.zeros_like(ts.obs["image"])
        return ts._replace(obs=replace_image(ts.obs, image), mask=mask)
