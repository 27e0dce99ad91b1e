"""Run settings as data: the CPU and GPU presets, and a run's overrides on top of them.

A run's settings are, in order: the preset's ``"*"`` entries, its ``"images"`` entries when the
run observes images (``obs`` pixels or both), its entries for the run's agent, then for its
model (where they depart from the rest), then the run's ``--set name=value`` overrides
(:attr:`rl.config.RunConfig.overrides`). ``planet.<field>`` and ``dreamer.<field>`` overrides
set fields of the preset's :class:`rl.agents.planet.PlanetConfig` /
:class:`rl.agents.dreamer.DreamerConfig`. Who reads what: the world-model trainer
(``model_lr``, ``model_batch``, ``seq_len``, ``model_pool``), the model registry
(:mod:`rl.models`: ``latent``, ``model_hidden``, ``stoch``, ``deter``, ``conv_depth``,
``d_model``, ``d_state``, ``mc_dropout``, ``features``, ``objective``: ``"paper"`` by default,
the KalMamba paper's Table 2 training of RSSM, VRKN and KalMamba: KL balancing 0.8 / 0.5 / 0.5
and free nats 3, :data:`rl.models.PAPER_OBJECTIVE`; ``"free-nats"``: free nats 3 without
balancing, as the VRKN paper; ``"elbo"``: the plain ELBO; ``reconstruction``: ``false`` trains
the reward-only baseline of the VRKN paper's Fig. 6, no reconstruction term,
:func:`pssm.inputs.without_reconstruction`), the agents (``hidden``: the width of SAC's hidden
layers, ``sac_layers``: their number, ``sac``: the rest of its
:class:`rl.agents.sac.SACConfig`, ``batch_size``, ``start_batch``, ``planet``, ``dreamer``;
``sac.<field>`` overrides work as ``planet.<field>``, except ``sac.hidden``: set ``hidden``).

The GPU preset is the KalMamba paper's setting (Becker, Freymuth & Neumann 2024, App. D,
Table 2 for the world models, Table 3 for SAC: its low-dimensional column, and its image-based
column for runs that observe images); the RSSM's width and the Dreamer and PlaNet agents keep
their own papers' values (Table 2: "for all other hyperparameters, we use the defaults from
Hafner et al. (2020) and Becker & Neumann (2022)"). The CPU preset keeps the same objective and
SAC settings at sizes that train in minutes on two cores.
"""

import jax

from rl.agents.dreamer import DREAMER_CPU, DreamerConfig
from rl.agents.planet import PLANET_CPU, PlanetConfig
from rl.agents.sac import SACConfig

#: KalMamba paper, Table 3 (low-dimensional DMC): ReLU, Adam 3e-4 for actor, critic and
#: temperature, target update fraction 0.005 every step, target entropy -|A| (None), initial
#: temperature 0.1, discount 0.99; the 2x256 widths are the ``hidden`` setting
SAC_TABLE3 = SACConfig(activation=jax.nn.relu, actor_lr=3e-4, critic_lr=3e-4, alpha_lr=3e-4,
                       tau=0.005, target_entropy=None, init_alpha=0.1, discount=0.99)  # fmt: skip

#: ... and its image-based column: 3x1024 ELU actor and critics, the rest as above
SAC_TABLE3_IMAGES = SAC_TABLE3._replace(activation=jax.nn.elu)

_SHARED = {"hidden": 256, "sac_layers": 2, "model_pool": 4, "model_lr": 1e-3, "start_batch": 8,
           "mc_dropout": True, "features": "mean", "objective": "paper",
           "reconstruction": True, "sac": SAC_TABLE3}  # fmt: skip

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
    # the papers' settings: KalMamba paper, App. D, Tables 2 and 3 (module docstring)
    "gpu": {
        "*": {
            **_SHARED,
            "hidden": 256,  # Table 3: actor and critics 2x256 (ReLU)
            "batch_size": 256,
            "model_lr": 3e-4,  # Table 2: Adam 3e-4
            "model_batch": 50,
            "seq_len": 32,  # Sec. 4: sequences of length 32
            "latent": 230,  # Table 2 (RSSM: 30 stochastic + 200 deterministic)
            "model_hidden": 256,  # Table 2: encoder, decoder, reward 2x256 (ELU); VRKN's
            # transition network and KalMamba's post-Mamba one (the VRKN dynamics model) too
            "stoch": 30,
            "deter": 200,
            "conv_depth": 32,
            "d_model": 256,  # Table 2: Mamba d_model 256, d_state 64
            "d_state": 64,
            "planet": PlanetConfig(),
            "dreamer": DreamerConfig(),
        },  # fmt: skip
        # Table 3, image-based DMC (any run that observes images)
        "images": {"hidden": 1024, "sac_layers": 3, "sac": SAC_TABLE3_IMAGES},
        # Dreamer and PlaNet as VRKN trains them (model lr 6e-4 / 1e-3, sequences of 50)
        "dreamer": {"model_lr": 6e-4, "seq_len": 50},
        "planet": {"model_lr": 1e-3, "seq_len": 50},
        "rssm": {"model_hidden": 200},  # PlaNet/Dreamer: 200 units
    },
}

#: settings whose value is one of a few names
CHOICES = {"features": ("mean", "sample"), "objective": ("paper", "free-nats", "elbo"),
           "reconstruction": (True, False)}  # fmt: skip

#: settings a run may override (``planet.<field>`` / ``dreamer.<field>`` besides)
SETTINGS = tuple(sorted(k for k in PRESETS["cpu"]["*"] if k not in ("planet", "dreamer", "sac")))


def check_overrides(overrides) -> None:
    """``ValueError`` naming any override that nothing reads (a typo would be ignored)."""
    base = PRESETS["cpu"]["*"]
    for name, value in overrides:
        prefix, _, field = name.partition(".")
        if name == "sac.hidden":
            raise ValueError(
                "override sac.hidden: set hidden (the width of each layer) and "
                "sac_layers (their number)"
            )
        if name not in SETTINGS and field not in getattr(base.get(prefix), "_fields", ()):
            raise ValueError(f"unknown override {name!r}; known: {SETTINGS} and planet.<field>, "
                             "dreamer.<field>, sac.<field>")  # fmt: skip
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"override {name}={value!r}: choose from {CHOICES[name]}")
        if name in SETTINGS:
            _check_value(name, base[name], value)


def _check_value(name: str, default, value) -> None:
    """``ValueError`` unless ``value`` can stand where the preset has ``default``: a size or
    count (an ``int`` there) must be an integer >= 1, a rate (a ``float``) a positive number, a
    switch (a ``bool``) true or false. (Fields of the agents' configurations are not checked
    here: some of their numbers may be zero.)"""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = number and isinstance(value, int) and value >= 1, "an integer >= 1"
    elif isinstance(default, float):
        ok, want = number and value > 0, "a positive number"
    else:
        return
    if not ok:
        raise ValueError(f"override {name}={value!r}: must be {want}")


def settings(cfg) -> dict:
    """The settings of run ``cfg`` (preset, agent, model, overrides; see the module docstring)."""
    check_overrides(cfg.overrides)
    preset = PRESETS[cfg.preset]
    images = preset.get("images", {}) if cfg.obs != "states" else {}
    out = {**preset["*"], **images, **preset.get(cfg.agent, {}), **preset.get(cfg.model, {})}
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
