"""Every model family of the registry acts through the runner, with every agent.

By default each family runs one tiny end-to-end run with one agent (pairs the runner tests in
tests/test_runner.py do not already cover); ``-m slow`` runs the whole family x agent matrix.
Each run: random prefill, training calls of the world model and the agent, an evaluation
episode; the world model's losses and the return must be finite and the agent's metrics
present.
"""

import json

import numpy as np
import pytest

from rl import runner
from rl.drivers import MODEL_AGENTS
from rl.models import MODELS
from rl.runner import RunConfig

TINY = (("hidden", 16), ("batch_size", 16), ("model_batch", 4), ("seq_len", 6), ("latent", 4),
        ("model_hidden", 8), ("stoch", 4), ("deter", 8), ("d_model", 8), ("d_state", 4),
        ("start_batch", 2), ("dreamer.actor_hidden", 8), ("dreamer.critic_hidden", 8),
        ("dreamer.horizon", 3), ("planet.candidates", 8), ("planet.iterations", 1),
        ("planet.top_k", 2), ("planet.horizon", 3))  # fmt: skip

#: one agent per family in the default suite, where tests/test_runner.py does not already run
#: one: it runs sac-belief and planet on the RSSM, Dreamer on VRKN and sac-belief on KalMamba
#: (the combination rssm-smoothing-mcd runs under -m slow only)
DEFAULT = {"rssm-mcd": "planet", "rssm-smoothing": "sac-belief", "vrkn-nomcd": "dreamer",
           "lvssf": "sac-belief", "ekvae": "planet"}  # fmt: skip
ELSEWHERE = ("rssm", "vrkn", "kalmamba", "rssm-smoothing-mcd")


def _cases():
    for model in MODELS:
        for agent in MODEL_AGENTS:
            marks = () if DEFAULT.get(model) == agent else (pytest.mark.slow,)
            yield pytest.param(model, agent, id=f"{agent}-{model}", marks=marks)


def test_every_family_has_a_default_case():
    assert set(DEFAULT) | set(ELSEWHERE) == set(MODELS)
    assert set(DEFAULT.values()) <= set(MODEL_AGENTS)


@pytest.mark.parametrize(("model", "agent"), list(_cases()))
def test_family_acts_through_the_runner(tmp_path, model, agent):
    cfg = RunConfig(agent=agent, model=model, variant="noisy", env_steps=400, prefill_steps=60,
                    train_every=40, updates=1, eval_every=10**9, eval_episodes=1,
                    checkpoint_every=10**9, overrides=TINY)  # fmt: skip
    summary = runner.run(cfg, tmp_path, progress=False, video=False, compilation_cache=False)
    assert summary["model"] == model and np.isfinite(summary["final_eval_return"])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "model_loss" in r]
    assert train and all(np.isfinite(r["model_loss"]) for r in train)
    if agent != "planet":  # a planner learns nothing: its calls train the model only
        agent_keys = {k for r in train for k in r} - {k for k in train[0] if k.startswith("model_")}
        assert agent_keys, "the agent reported no training metrics"
        assert all(np.isfinite(v) for r in train for k, v in r.items() if k in agent_keys
                   and isinstance(v, float))  # fmt: skip


def test_paper_objective_trains_rssm_with_balanced_kl_and_free_nats():
    """``--set objective=paper`` trains the RSSM with the KalMamba paper's Table 2 objective:
    free nats 3 and KL balance 0.8 (same loss and gradient as that ELBO built by hand)."""
    import jax

    from inference.objectives import FreeNatsELBO
    from rl.models import build
    from rl.presets import PRESETS
    from rl.world_models.rssm import rssm_world_model

    s = {**PRESETS["cpu"]["*"], "stoch": 4, "deter": 8, "model_hidden": 8, "conv_depth": 4}
    rng = np.random.default_rng(0)
    batch = {"obs": rng.normal(size=(2, 5, 3)), "actions": rng.uniform(-1, 1, (2, 5, 1)),
             "rewards": rng.normal(size=(2, 5)), "mask": np.ones((2, 5), bool)}  # fmt: skip

    def loss_and_grad(wm):
        params, aux = wm.objective.init(jax.random.key(0), batch)
        # away from the initialisation (whose steps all lie below the free nats: no KL gradient)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(5), len(leaves))
        params = tree.unflatten([v + 0.5 * jax.random.normal(k, v.shape, v.dtype)
                                 for v, k in zip(leaves, keys, strict=True)])  # fmt: skip
        f = lambda p: wm.objective.loss(p, aux, jax.random.key(1), batch)[0]  # noqa: E731
        return jax.value_and_grad(f)(params)

    by_hand = dict(stoch=4, deter=8, hidden=8, conv_depth=4, seed=0)
    paper = loss_and_grad(build("rssm", 3, 1, {**s, "objective": "paper"}, seed=0))
    ref = loss_and_grad(rssm_world_model(3, 1, elbo=FreeNatsELBO(3.0, balance=0.8), **by_hand))
    # equal gradients: with the KL above the free nats (perturbed parameters), a missing or
    # other balance would change them (tests/test_free_nats.py: the gradient split itself)
    for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_objective_is_a_checked_run_setting():
    from rl.config import ConfigError, RunConfig, check

    check(RunConfig(model="rssm", overrides=(("objective", "paper"),)))
    with pytest.raises(ConfigError, match="objective"):
        check(RunConfig(model="rssm", overrides=(("objective", "papers"),)))
