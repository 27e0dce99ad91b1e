"""Run settings as data: the CPU and GPU presets, and a run's overrides on top of them.

A run's settings are, in order: the preset's ``"*"`` entries, the preset's entries for the run's
agent, then for its model (where they depart from the rest), then the run's ``--set
name=value`` overrides (:attr:`rl.config.RunConfig.overrides`). ``planet.<field>`` and
``dreamer.<field>`` overrides set fields of the preset's :class:`rl.agents.planet.PlanetConfig`
/ :class:`rl.agents.dreamer.DreamerConfig`. Who reads what: the world-model trainer
(``model_lr``, ``model_batch``, ``seq_len``, ``model_pool``), the model registry
(:mod:`rl.models`: ``latent``, ``model_hidden``, ``stoch``, ``deter``, ``conv_depth``,
``d_model``, ``d_state``, ``mc_dropout``, ``features``, ``objective``: ``"default"`` or
``"paper"``, the KalMamba paper's Table 2 training of RSSM, VRKN and KalMamba: KL balancing
and free nats, :data:`rl.models.PAPER_OBJECTIVE`), the agents (``hidden``,
``batch_size``, ``start_batch``, ``planet``, ``dreamer``).
"""

from rl.agents.dreamer import DREAMER_CPU, DreamerConfig
from rl.agents.planet import PLANET_CPU, PlanetConfig

_SHARED = {"hidden": 256, "model_pool": 4, "model_lr": 1e-3, "start_batch": 8,
           "mc_dropout": True, "features": "mean", "objective": "default"}  # fmt: skip

PRESETS: dict[str, dict[str, dict]] = {
    # minutes on 2 CPU cores
    "cpu": {
        "*": {
            **_SHARED,
            "batch_size": 128,
            "model_batch": 16,
            "seq_len": 32,
            "latent": 32,
            "model_hidden": 64,
            "stoch": 16,
            "deter": 64,
            "conv_depth": 16,
            "d_model": 64,
            "d_state": 16,
            "planet": PLANET_CPU,
            "dreamer": DREAMER_CPU,
        },  # fmt: skip
        "sac": {"batch_size": 256},
        "dreamer": {"model_lr": 6e-4},
    },
    # the papers' sizes (PlaNet/Dreamer: RSSM 30/200/200; VRKN, KalMamba: latent 230, 300 units)
    "gpu": {
        "*": {
            **_SHARED,
            "batch_size": 256,
            "model_batch": 50,
            "seq_len": 50,
            "latent": 230,
            "model_hidden": 300,
            "stoch": 30,
            "deter": 200,
            "conv_depth": 32,
            "d_model": 256,
            "d_state": 64,
            "planet": PlanetConfig(),
            "dreamer": DreamerConfig(),
        },  # fmt: skip
        "dreamer": {"model_lr": 6e-4},
        "rssm": {"model_hidden": 200},
    },
}

#: settings whose value is one of a few names
CHOICES = {"features": ("mean", "sample"), "objective": ("default", "paper")}

#: settings a run may override (``planet.<field>`` / ``dreamer.<field>`` besides)
SETTINGS = tuple(sorted(k for k in PRESETS["cpu"]["*"] if k not in ("planet", "dreamer")))


def check_overrides(overrides) -> None:
    """``ValueError`` naming any override that nothing reads (a typo would be ignored)."""
    base = PRESETS["cpu"]["*"]
    for name, value in overrides:
        prefix, _, field = name.partition(".")
        if name not in SETTINGS and field not in getattr(base.get(prefix), "_fields", ()):
            raise ValueError(f"unknown override {name!r}; known: {SETTINGS} and planet.<field>, "
                             "dreamer.<field>")  # fmt: skip
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"override {name}={value!r}: choose from {CHOICES[name]}")


def settings(cfg) -> dict:
    """The settings of run ``cfg`` (preset, agent, model, overrides; see the module docstring)."""
    check_overrides(cfg.overrides)
    preset = PRESETS[cfg.preset]
    out = {**preset["*"], **preset.get(cfg.agent, {}), **preset.get(cfg.model, {})}
    for name, value in cfg.overrides:
        prefix, _, field = name.partition(".")
        if not field:
            out[name] = value
            continue
        default = getattr(out[prefix], field)
        if isinstance(default, tuple | list):  # dreamer.actor_hidden=64 -> (64, 64)
            value = tuple(value) if isinstance(value, tuple | list) else (value,) * len(default)
        out[prefix] = out[prefix]._replace(**{field: value})
    return out
