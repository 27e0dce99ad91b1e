"""A run's configuration: :class:`RunConfig`, its validation and how two of them differ.

:func:`check` refuses a configuration before anything is written: names from the registries
(:data:`rl.drivers.AGENTS`, :data:`rl.models.MODELS` or a ``module:factory``,
:data:`rl.presets.PRESETS`, dm_control
tasks, :data:`rl.envs.OBS_MODES`, :data:`rl.envs.VARIANTS`), positive counts and compatible
combinations. Each error is a :class:`ConfigError` naming the field, which the command line
turns into its flag. :func:`resume_differences` says which fields of a resumed run differ from
the stored ones (``env_steps`` may grow: that extends a run).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from . import envs, models
from .drivers import AGENTS, PRESETS
from .presets import check_overrides


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run: what to train, on which task, for how long.

    The defaults are the main job: SAC on the filtered belief of a VRKN world model on
    cartpole-swingup from noisy states (observation and action noise N(0, 0.3), the KalMamba
    setting), 100k environment steps with the CPU preset (minutes on 2 CPU cores).

    Attributes:
        agent: ``"sac"`` (raw observations), ``"sac-belief"`` (SAC on a world model's filtered
            belief mean), ``"dreamer"``, ``"planet"`` or ``"random"``.
        model: world model for model-based agents: a name of the registry
            :data:`rl.models.MODELS` (``"rssm"``, ``"rssm-mcd"``, ``"rssm-smoothing"``,
            ``"vrkn"``, ``"vrkn-nomcd"``, ``"kalmamba"``, ``"lvssf"``, ``"ekvae"``, ...) or a
            user's ``"module.path:factory"`` (see :mod:`rl.models`).
        task: dm_control task, e.g. ``"cartpole-swingup"``.
        obs: ``"states"``, ``"pixels"`` or ``"both"``.
        image_size: height and width of rendered images (a multiple of 16, at least 48 for the
            conv encoder; the papers: 64).
        variant: environment variant (:data:`rl.envs.VARIANTS` name) or ``None``.
        preset: ``"cpu"`` or ``"gpu"``: network sizes, batch sizes, planner sizes.
        seed: everything random in the run derives from it.
        env_steps: simulator steps of training (the papers' unit).
        prefill_steps: agent steps of a uniform random policy before any training.
        action_repeat: ``None`` for the task default.
        train_every: agent steps between training calls.
        updates: agent (and world-model) updates per training call.
        eval_every: agent steps between evaluations (at episode ends).
        eval_episodes: episodes per evaluation (deterministic policy, separate seeds).
        checkpoint_every: agent steps between checkpoints (at episode ends).
        replay_capacity: rows kept in replay.
        overrides: ``((name, value), ...)`` on top of the preset's settings (:mod:`rl.presets`).
    """

    agent: str = "sac-belief"
    model: str = "vrkn"
    task: str = "cartpole-swingup"
    obs: str = "states"
    image_size: int = 64
    variant: str | None = "noisy"
    preset: str = "cpu"
    seed: int = 0
    env_steps: int = 100_000
    prefill_steps: int = 1_000
    action_repeat: int | None = None
    train_every: int = 50
    updates: int = 50
    eval_every: int = 5_000
    eval_episodes: int = 5
    checkpoint_every: int = 5_000
    replay_capacity: int = 1_000_000
    overrides: tuple = ()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
        return cls(**d)


class ConfigError(ValueError):
    """An invalid or incompatible configuration; ``field`` names the :class:`RunConfig` field
    (``"overrides"`` for ``--set``, ``"run_dir"`` / ``"resume"`` for the run directory)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


#: counts and their least allowed values
_AT_LEAST = {"image_size": 1, "seed": 0, "env_steps": 1, "prefill_steps": 0, "train_every": 1,
             "updates": 1, "eval_every": 1, "eval_episodes": 1, "checkpoint_every": 1,
             "replay_capacity": 1}  # fmt: skip


def _choice(field: str, value, choices) -> None:
    if value not in choices:
        listing = ", ".join("none" if c is None else str(c) for c in choices)  # the CLI's spelling
        raise ConfigError(field, f"unknown {field} {value!r}; choose from {listing}")


def check(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` (naming the field) unless ``cfg`` can run."""
    for name, least in _AT_LEAST.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(name, f"must be an integer >= {least}, got {value!r}")
    if cfg.action_repeat is not None and (
        not isinstance(cfg.action_repeat, int) or cfg.action_repeat < 1
    ):
        raise ConfigError("action_repeat", f"must be a positive integer, got {cfg.action_repeat!r}")
    _choice("agent", cfg.agent, AGENTS)
    try:
        models.check_model(cfg.model)
    except ValueError as e:
        raise ConfigError("model", str(e)) from None
    _choice("preset", cfg.preset, PRESETS)
    _choice("obs", cfg.obs, tuple(envs.OBS_MODES))
    _choice("variant", cfg.variant, (None, *envs.VARIANTS))
    try:
        envs.parse_task(cfg.task)
    except ValueError:
        raise ConfigError("task", f"unknown dm_control task {cfg.task!r}; e.g. cartpole-swingup, "
                          "cheetah-run, walker-walk (all: dm_control.suite.ALL_TASKS)"
                          ) from None  # fmt: skip
    try:
        envs.modalities_for(cfg.obs, envs.as_variant(cfg.variant))
    except ValueError as e:
        raise ConfigError("variant", f"{cfg.variant!r} with obs {cfg.obs!r}: {e}") from None
    if cfg.agent == "sac" and cfg.obs != "states":
        raise ConfigError("obs", "plain SAC takes state vectors: use obs 'states' (or sac-belief)")
    conv = cfg.obs != "states" and cfg.agent not in ("random", "sac")
    if conv and (cfg.image_size % 16 or cfg.image_size < 48):
        raise ConfigError("image_size", "the world model's conv encoder and decoder need a "
                          f"multiple of 16 of at least 48, got {cfg.image_size}")  # fmt: skip
    try:
        check_overrides(cfg.overrides)
    except ValueError as e:
        raise ConfigError("overrides", str(e)) from None


def resume_differences(stored: RunConfig, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """``[(field, stored value, given value), ...]`` for every field in which ``cfg`` may not
    resume ``stored``; ``env_steps`` may be raised (the run is extended), not lowered."""
    out = []
    for f in dataclasses.fields(RunConfig):
        a, b = getattr(stored, f.name), getattr(cfg, f.name)
        if a != b and not (f.name == "env_steps" and b > a):
            out.append((f.name, a, b))
    return out


def describe(differences, name: Callable[[str], str] = str) -> str:
    """``"seed (stored 0, given 1), ..."`` with each field named by ``name(field)``."""
    parts = []
    for field, a, b in differences:
        note = ", it may only be raised" if field == "env_steps" else ""
        parts.append(f"{name(field)} (stored {a!r}, given {b!r}{note})")
    return ", ".join(parts)
