"""Environments: dm_control suite tasks from pixels and/or states, and their harder variants.

    env = make("cartpole-swingup", obs="pixels", variant="occlusion", seed=0)
    ts = env.reset()                      # TimeStep(obs, reward, done, mask, info)
    while not ts.done:
        ts = env.step(policy(ts.obs))     # ts.reward: reward for that action (repeat summed)
    env.last_episode                      # EpisodeStats(episode_return, length)

Observations: ``"pixels"`` ``(64, 64, 3)`` uint8 from camera 0; ``"states"`` the task's
observation dict flattened to float32 in its spec order; ``"both"`` ``{"image", "state"}``; or a
tuple of modalities from ``("image", "state", "proprio")``. Masks flag each modality per step
(:mod:`rl.envs.core`). Variants (:mod:`rl.envs.variants`): transition noise, observation noise,
occluding discs, sensor fusion (images every 4..8 steps, proprioception every step).

Default action repeats (PlaNet, Hafner et al. 2019): cartpole 8, finger 2, cheetah 4, cup 4,
walker 2, reacher 4, any other domain 2; ``action_repeat=`` overrides them. Episodes last
``env.episode_length`` agent steps (1000 simulator steps / repeat, rounded up).

Importing this package sets ``MUJOCO_GL=egl`` unless already set (headless rendering); it must
be imported before anything imports dm_control.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from rl.envs.core import (  # noqa: E402
    ArraySpec,
    EpisodeStats,
    TimeStep,
    Wrapper,
    validate_action,
)
from rl.envs.dmc import (  # noqa: E402
    DEFAULT_ACTION_REPEAT,
    FALLBACK_ACTION_REPEAT,
    PROPRIO,
    DMCEnv,
    parse_task,
)
from rl.envs.variants import (  # noqa: E402
    VARIANTS,
    Fusion,
    ObservationNoise,
    Occluded,
    Occlusion,
    SensorFusion,
    TransitionNoise,
    Variant,
    as_variant,
)

OBS_MODES = {"pixels": ("image",), "states": ("state",), "both": ("image", "state")}

__all__ = [
    "DEFAULT_ACTION_REPEAT",
    "FALLBACK_ACTION_REPEAT",
    "OBS_MODES",
    "PROPRIO",
    "VARIANTS",
    "ArraySpec",
    "DMCEnv",
    "EpisodeStats",
    "Fusion",
    "ObservationNoise",
    "Occluded",
    "Occlusion",
    "SensorFusion",
    "TimeStep",
    "TransitionNoise",
    "Variant",
    "Wrapper",
    "as_variant",
    "make",
    "modalities_for",
    "parse_task",
    "validate_action",
]


def modalities_for(obs, variant: Variant) -> tuple[str, ...]:
    """The base environment's modalities for an ``obs`` mode under ``variant``.

    With sensor fusion, ``"pixels"`` becomes ``("image", "proprio")`` (VRKN's fusion tasks) and
    ``"both"`` ``("image", "state")``; ``"states"`` has no image to subsample and is refused.
    """
    if isinstance(obs, str):
        if obs not in OBS_MODES:
            raise ValueError(f"obs must be one of {sorted(OBS_MODES)} or a tuple, got {obs!r}")
        modalities = OBS_MODES[obs]
        if variant.fusion is not None and obs == "pixels":
            modalities = ("image", "proprio")
    else:
        modalities = tuple(obs)
    if variant.fusion is not None and ("image" not in modalities or len(modalities) < 2):
        raise ValueError(f"sensor fusion needs images and another modality, got obs={obs!r}")
    if variant.observation_noise > 0 and not {"state", "proprio"} & set(modalities):
        raise ValueError(f"observation noise needs a low-dimensional modality, got obs={obs!r}")
    if variant.occlusion is not None and "image" not in modalities:
        raise ValueError(f"occlusion needs images, got obs={obs!r}")
    return modalities


def make(
    task: str,
    obs="pixels",
    variant=None,
    *,
    action_repeat: int | None = None,
    seed: int | None = None,
    size: int = 64,
    camera: int = 0,
    clip_actions: bool = True,
):
    """A dm_control suite task with the requested observations and variant.

    Args:
        task: ``"domain-task"`` (``"cartpole-swingup"``, ``"cup-catch"``) or ``"domain_task"``.
        obs: ``"pixels"``, ``"states"``, ``"both"`` or a tuple of modalities from
            ``("image", "state", "proprio")`` (see :func:`modalities_for` under fusion).
        variant: ``None``, a preset name from :data:`VARIANTS`, a :class:`Variant` or a dict of
            its fields (:func:`as_variant`).
        action_repeat: agent-step repeat; ``None`` for the task default (module docstring).
        seed: seeds the task and every variant; ``None`` draws one (kept as ``env.seed``).
        size: image size (square).
        camera: camera id for images.
        clip_actions: clip out-of-bounds actions (default) or raise ``ValueError``.

    Returns:
        The environment: a :class:`DMCEnv`, wrapped as transition noise -> observation noise ->
        occlusion -> sensor fusion (innermost first), each only when the variant asks for it.
    """
    variant = as_variant(variant)
    modalities = modalities_for(obs, variant)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    domain, task_name = parse_task(task)
    env = DMCEnv(
        domain,
        task_name,
        modalities=modalities,
        action_repeat=action_repeat,
        seed=seed,
        size=size,
        camera=camera,
        clip_actions=clip_actions,
    )
    if variant.transition_noise > 0:
        env = TransitionNoise(env, variant.transition_noise, seed)
    if variant.observation_noise > 0:
        env = ObservationNoise(env, variant.observation_noise, seed)
    if variant.occlusion is not None:
        env = Occluded(env, variant.occlusion, seed)
    if variant.fusion is not None:
        env = SensorFusion(env, variant.fusion, seed)
    env.unwrapped.variant = variant  # readable through every wrapper
    return env
