"""The model registry: every world model a run, a benchmark or an example can name.

:func:`parts` builds the family's model, its guide and ELBO (:class:`rl.world_model.ModelParts`),
sized by a run's settings (:mod:`rl.presets`); :func:`build` derives the
world model from the model's belief step (:func:`rl.world_model.from_parts`), and experiments
that only train and evaluate a model (``examples/pendulum_sysid.py``) take :func:`parts`. Names
follow the papers' rows: the RSSM of PlaNet/Dreamer with its MC-dropout and smoothing variants
(Becker & Neumann 2022, Fig. 4), VRKN with and without MC dropout (Fig. 5), KalMamba, L-VSSF
and EKVAE.

A model of one's own needs no line here: ``pssm run --model my_package.my_module:factory``
imports ``factory`` and calls ``factory(obs_dims, action_dim, seed=seed)``, which returns a
:class:`rl.world_model.ModelParts` (model, guide, ELBO: trained as the registry's models are,
per-pixel masks and ``reconstruction=false`` included), a ``WorldModel``, or a pair
``(model, objective)`` of a model offering a belief step with a reward head
(:mod:`pssm.belief`) and its :class:`inference.training.Objective`.
"""

import importlib
from collections.abc import Callable

from pssm.inputs import without_reconstruction

from .world_model import ModelParts, WorldModel, belief_world_model, from_parts

#: ``(KL balance, free nats)`` per family under ``objective=paper``, the presets' default
#: (KalMamba paper, Table 2: RSSM 0.8, VRKN and KalMamba 0.5; free nats 3 for all three)
PAPER_OBJECTIVE = {"rssm": (0.8, 3.0), "vrkn": (0.5, 3.0), "kalmamba": (0.5, 3.0)}


def _elbo(family: str, s: dict):
    """The ELBO a family trains with under the run's ``objective`` setting: ``"paper"`` (the
    default) free nats and KL balancing as :data:`PAPER_OBJECTIVE`; ``"free-nats"`` free nats 3
    without balancing (the VRKN paper's and its official code's objective); ``"elbo"`` the plain
    mean-field ELBO (``FreeNatsELBO(0)``, which is ``TraceMeanField_ELBO`` with its metrics)."""
    from inference.objectives import FreeNatsELBO

    balance, free_nats = PAPER_OBJECTIVE[family]
    objective = s.get("objective", "paper")
    if objective == "elbo":
        return FreeNatsELBO(0.0)
    if objective == "free-nats":
        return FreeNatsELBO(free_nats)
    if objective != "paper":
        raise ValueError(f"unknown objective {objective!r}; choose paper, free-nats or elbo")
    return FreeNatsELBO(free_nats, balance=balance)


def _rssm(s: dict):
    from .world_models.rssm import rssm_parts

    return rssm_parts, dict(stoch=int(s["stoch"]), deter=int(s["deter"]),
                            hidden=int(s["model_hidden"]), conv_depth=int(s["conv_depth"]),
                            elbo=_elbo("rssm", s))  # fmt: skip


def _vrkn(s: dict):
    from .world_models.vrkn import vrkn_parts

    h = int(s["model_hidden"])
    return vrkn_parts, dict(latent_dim=int(s["latent"]), hidden=h, mlp_hidden=(h, h),
                            mc_dropout=bool(s["mc_dropout"]), features=str(s["features"]),
                            conv_depth=int(s["conv_depth"]), elbo=_elbo("vrkn", s))  # fmt: skip


def _kalmamba(s: dict):
    from .world_models.kalmamba import kalmamba_parts

    h = int(s["model_hidden"])
    return kalmamba_parts, dict(mc_dropout=bool(s["mc_dropout"]), latent_dim=int(s["latent"]),
                                hidden=(h, h), d_model=int(s["d_model"]),
                                d_state=int(s["d_state"]), conv_depth=int(s["conv_depth"]),
                                elbo=_elbo("kalmamba", s))  # fmt: skip


def _lvssf(s: dict):
    from .world_models.lvssf import lvssf_parts

    return lvssf_parts, dict(latent_dim=int(s["latent"]), hidden=int(s["model_hidden"]))


def _ekvae(s: dict):
    from .world_models.ekvae import ekvae_parts

    return ekvae_parts, dict(latent_dim=int(s["latent"]), hidden=int(s["model_hidden"]))


def _variant(family, **fixed):
    """``family`` with some of its builder's arguments fixed (a paper's row of that family)."""

    def arguments(s: dict):
        builder, kwargs = family(s)
        return builder, {**kwargs, **fixed}

    return arguments


#: MC-dropout rate of the RSSM variants (VRKN paper, Sec. 4.1: as VRKN's, 0.1)
RSSM_DROPOUT = 0.1

#: name -> ``settings -> (builder, arguments)``: the family's ``*_parts`` builder of
#: :mod:`rl.world_models` and its arguments read from a run's settings
MODELS: dict[str, Callable[[dict], tuple[Callable[..., ModelParts], dict]]] = {
    "rssm": _rssm,
    "rssm-mcd": _variant(_rssm, mc_dropout=RSSM_DROPOUT),
    "rssm-smoothing": _variant(_rssm, smoothing=True),
    "rssm-smoothing-mcd": _variant(_rssm, smoothing=True, mc_dropout=RSSM_DROPOUT),
    "vrkn": _vrkn,
    "vrkn-nomcd": _variant(_vrkn, mc_dropout=False),
    "kalmamba": _kalmamba,
    "lvssf": _lvssf,
    "ekvae": _ekvae,
}


def is_factory_path(name: str) -> bool:
    """Whether ``name`` is ``module.path:attribute`` (a user's factory) rather than a name."""
    return ":" in name


def load_factory(path: str) -> Callable:
    """The callable ``module.path:attribute`` names; ``ValueError`` saying what is wrong."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"expected module.path:factory, got {path!r}")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import {module!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def check_model(name: str) -> None:
    """``ValueError`` unless ``name`` is a registry name or an importable factory."""
    if is_factory_path(name):
        load_factory(name)
    elif name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)} or give "
                         "module.path:factory")  # fmt: skip


def parts(
    name: str, obs_dims, action_dim: int, settings: dict, seed: int = 0, **overrides
) -> ModelParts:
    """Model, guide and ELBO of the registry's ``name``, sized by ``settings`` (a run's settings,
    :func:`rl.presets.settings`); ``overrides`` are arguments of the family's builder in
    :mod:`rl.world_models` (e.g. ``reward=False`` for a model that only trains, ``obs_var``).
    With the setting ``reconstruction=False`` the model's observation sites are hidden from
    the ELBO (:func:`pssm.inputs.without_reconstruction`: the reward-only baseline of Becker &
    Neumann 2022, Fig. 6); the guide and the acting filter still read the observations."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    builder, kwargs = MODELS[name](settings)
    made = builder(obs_dims, int(action_dim), **{**kwargs, "seed": int(seed), **overrides})
    return with_settings(made, settings)


def with_settings(made: ModelParts, settings: dict) -> ModelParts:
    """``made`` as the run's settings train it: with ``reconstruction=False`` the reward-only
    baseline (VRKN Fig. 6)."""
    if not settings.get("reconstruction", True):
        made = made._replace(model=without_reconstruction(made.model))
    return made


def build(name: str, obs_dims, action_dim: int, settings: dict, seed: int = 0) -> WorldModel:
    """The world model ``name`` (registry name or ``module.path:factory``) for observations of
    shape ``obs_dims`` (one shape, or ``{modality: shape}``) and ``action_dim`` actions."""
    check_model(name)
    if not is_factory_path(name):
        if int(action_dim) < 1:
            raise ValueError(f"a world model needs actions, got action_dim={action_dim}")
        return from_parts(parts(name, obs_dims, action_dim, settings, seed))
    made = load_factory(name)(obs_dims, int(action_dim), seed=int(seed))
    if isinstance(made, ModelParts):  # trained and masked as the registry's models are
        return from_parts(with_settings(made, settings))
    if not settings.get("reconstruction", True):
        raise ValueError(f"reconstruction=false needs a registry model or a factory returning "
                         f"rl.world_model.ModelParts: {name} returned its own objective "
                         "(use pssm.inputs.without_reconstruction there)")  # fmt: skip
    if isinstance(made, WorldModel):
        return made
    if isinstance(made, tuple) and len(made) == 2:
        return belief_world_model(*made)
    raise TypeError(f"{name} returned {type(made).__name__}: expected rl.world_model.ModelParts, "
                    "a WorldModel or a pair (model, objective)")  # fmt: skip
