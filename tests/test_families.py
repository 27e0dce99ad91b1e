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

#: one agent per family in the default suite (tests/test_runner.py runs sac-belief and planet
#: on the RSSM, Dreamer on VRKN and sac-belief on KalMamba)
DEFAULT = {"rssm": "dreamer", "rssm-mcd": "planet", "rssm-smoothing": "sac-belief",
           "rssm-smoothing-mcd": "dreamer", "vrkn": "planet", "vrkn-nomcd": "sac-belief",
           "kalmamba": "planet", "lvssf": "sac-belief", "ekvae": "dreamer"}  # fmt: skip


def _cases():
    for model in MODELS:
        for agent in MODEL_AGENTS:
            marks = () if DEFAULT.get(model) == agent else (pytest.mark.slow,)
            yield pytest.param(model, agent, id=f"{agent}-{model}", marks=marks)


def test_every_family_has_a_default_case():
    assert set(DEFAULT) == set(MODELS)
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
