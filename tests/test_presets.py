"""The presets as data: the GPU preset is the KalMamba paper's setting (App. D, Tables 2 and 3),
and every preset trains RSSM, VRKN and KalMamba with the paper's objective unless a run asks
for the plain ELBO (``--set objective=elbo``) or
the VRKN paper's free nats without balancing (``--set objective=free-nats``)."""

import inspect

import jax
import pytest

from inference.objectives import FreeNatsELBO
from pssm.kalmamba import kalmamba
from rl.config import ConfigError, RunConfig, check
from rl.drivers import sac_config
from rl.models import MODELS
from rl.presets import settings

#: KalMamba paper (Becker, Freymuth & Neumann 2024), App. D, the numbers as printed there:
#: Table 2 (low-dimensional DMC) and Sec. 4 (sequences of length 32) ...
TABLE_2 = {"model_hidden": 256, "latent": 230, "stoch": 30, "deter": 200, "d_model": 256,
           "d_state": 64, "model_lr": 3e-4, "seq_len": 32}  # fmt: skip
MAMBA_TABLE_2 = {"num_blocks": 2, "d_conv": 2, "dropout": 0.1, "pre_layers": 2}
#: ... "KL Balancing 0.8 for RSSM, 0.5 for VRKN, KalMamba; Free Nats 3"
OBJECTIVE_TABLE_2 = {"rssm": (0.8, 3.0), "vrkn": (0.5, 3.0), "kalmamba": (0.5, 3.0)}
#: ... and Table 3 (SAC, low-dimensional DMC): 2x256 ReLU, Adam 3e-4 for actor, critic and
#: entropy, target update fraction 0.005 every step, target entropy -|A|, initial 0.1, gamma 0.99
TABLE_3 = {"hidden": (256, 256), "activation": jax.nn.relu, "actor_lr": 3e-4, "critic_lr": 3e-4,
           "alpha_lr": 3e-4, "tau": 0.005, "target_entropy": None, "init_alpha": 0.1,
           "discount": 0.99}  # fmt: skip

#: ... and Table 3's image-based column: 3x1024 ELU, the rest as the low-dimensional one
TABLE_3_IMAGES = {**TABLE_3, "hidden": (1024, 1024, 1024), "activation": jax.nn.elu}

FAMILY = {"rssm": "rssm", "rssm-mcd": "rssm", "rssm-smoothing": "rssm",
          "rssm-smoothing-mcd": "rssm", "vrkn": "vrkn", "vrkn-nomcd": "vrkn",
          "kalmamba": "kalmamba"}  # fmt: skip


def _settings(agent="sac-belief", model="kalmamba", preset="gpu", overrides=(), obs="states"):
    return settings(
        RunConfig(agent=agent, model=model, preset=preset, overrides=overrides, obs=obs)
    )


@pytest.mark.parametrize("obs", ["pixels", "both"])
def test_gpu_preset_gives_sac_on_images_table_3s_image_column(obs):
    """A run that observes images gets Table 3's image-based SAC; the world model's settings
    stay Table 2's; a run may still set the layers (``--set sac_layers=2``)."""
    s = _settings(obs=obs)
    assert {k: getattr(sac_config(s), k) for k in TABLE_3_IMAGES} == TABLE_3_IMAGES
    assert {k: s[k] for k in TABLE_2} == TABLE_2
    assert sac_config(_settings(obs=obs, overrides=(("sac_layers", 2),))).hidden == (1024, 1024)
    cpu = sac_config(_settings(obs=obs, preset="cpu"))  # the CPU preset keeps its small SAC
    assert cpu.hidden == (256, 256) and cpu.activation is jax.nn.relu


def test_gpu_preset_is_the_kalmamba_papers_tables_2_and_3():
    s = _settings()
    assert {k: s[k] for k in TABLE_2} == TABLE_2
    assert {k: getattr(sac_config(s), k) for k in TABLE_3} == TABLE_3
    # what the registry hands the KalMamba builder, and the builder's own defaults for the rest
    _, kwargs = MODELS["kalmamba"](s)
    assert kwargs["hidden"] == (256, 256) and kwargs["latent_dim"] == 230
    assert (kwargs["d_model"], kwargs["d_state"]) == (256, 64)
    defaults = inspect.signature(kalmamba).parameters
    assert {k: defaults[k].default for k in MAMBA_TABLE_2} == MAMBA_TABLE_2
    # the baselines "use the same hyper-parameters as KalMamba where applicable"; the RSSM keeps
    # PlaNet's 200 units and 30 + 200 latent, Dreamer and PlaNet their own learning rates
    rssm = _settings(model="rssm")
    assert (rssm["stoch"], rssm["deter"], rssm["model_hidden"], rssm["model_lr"]) == (
        30, 200, 200, 3e-4)  # fmt: skip
    assert _settings(agent="dreamer", model="vrkn")["model_lr"] == 6e-4
    assert _settings(agent="planet", model="rssm")["model_lr"] == 1e-3


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
@pytest.mark.parametrize("model", sorted(FAMILY))
def test_presets_train_with_the_papers_objective_by_default(preset, model):
    elbo = MODELS[model](_settings(model=model, preset=preset))[1]["elbo"]
    assert isinstance(elbo, FreeNatsELBO)
    assert (elbo.balance, elbo.free_nats) == OBJECTIVE_TABLE_2[FAMILY[model]]
    plain = MODELS[model](_settings(model=model, preset=preset,
                                    overrides=(("objective", "elbo"),)))[1]["elbo"]  # fmt: skip
    assert isinstance(plain, FreeNatsELBO) and (plain.balance, plain.free_nats) == (None, 0.0)
    vrkn = MODELS[model](_settings(model=model, preset=preset,
                                   overrides=(("objective", "free-nats"),)))[1]["elbo"]  # fmt: skip
    assert isinstance(vrkn, FreeNatsELBO) and (vrkn.balance, vrkn.free_nats) == (None, 3.0)


def test_objective_and_sac_settings_are_checked_overrides():
    check(RunConfig(model="rssm", overrides=(("objective", "elbo"),)))
    with pytest.raises(ConfigError, match="objective"):
        check(RunConfig(model="rssm", overrides=(("objective", "default"),)))
    s = _settings(preset="cpu", overrides=(("sac.tau", 0.01), ("hidden", 32)))
    assert sac_config(s).tau == 0.01 and sac_config(s).hidden == (32, 32)
    assert sac_config(s).actor_lr == 3e-4  # the rest stays Table 3's
    with pytest.raises(ConfigError, match="hidden"):
        check(RunConfig(overrides=(("sac.hidden", 64),)))


@pytest.mark.parametrize(
    ("name", "value"),
    [("hidden", 0), ("sac_layers", 1.5), ("latent", True), ("model_lr", -1e-3), ("model_lr", "x"),
     ("mc_dropout", "yes"), ("seq_len", -4)],
)  # fmt: skip
def test_a_setting_with_a_value_it_cannot_take_is_a_config_error(name, value):
    with pytest.raises(ConfigError, match=f"{name}={value!r}: must be"):
        check(RunConfig(overrides=((name, value),)))


def test_settings_take_values_of_their_kind():
    cfg = RunConfig(
        overrides=(("hidden", 64), ("sac_layers", 3), ("model_lr", 1), ("mc_dropout", False))
    )
    check(cfg)
    s = settings(cfg)
    assert (s["hidden"], s["sac_layers"], s["model_lr"], s["mc_dropout"]) == (64, 3, 1, False)
