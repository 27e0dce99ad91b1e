"""One check for any world model on state vectors: it trains a few steps and acts."""

import jax
import numpy as np
import optax

from inference import training
from rl.world_model import filter_sequence


def trains_and_acts(wm, latent: int, *, B: int = 4, T: int = 6) -> list[dict]:
    """Train ``wm`` 3 steps on random two-modality data, then check the shapes of one observe /
    imagine step, the reward and the decoder, and the filtered beliefs of the batch. Returns
    the training history (finite losses asserted)."""
    dims, u = {"position": 3, "velocity": 2}, wm.action_dim
    rng = np.random.default_rng(0)
    data = {
        "obs": {k: rng.normal(size=(B, T, p)) for k, p in dims.items()},
        "actions": rng.uniform(-1, 1, size=(B, T, u)),
        "rewards": rng.normal(size=(B, T)),
        "mask": np.ones((B, T, 2), bool),
    }
    state, history = training.fit(wm.objective, data, optax.adam(1e-3), num_steps=3,
                                  batch_size=B, key=jax.random.key(0), steps_per_call=3,
                                  progress=False)  # fmt: skip
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    params, key = wm.objective.constrain(state.params), jax.random.key(1)
    b = wm.init_belief(params, B)
    b = wm.observe(params, key, b, {k: v[:, 0] for k, v in data["obs"].items()}, None)
    b = wm.imagine(params, key, b, data["actions"][:, 0])
    f = wm.features(params, b)
    assert f.shape == (B, wm.feature_size) == (B, latent)
    assert wm.reward(params, f).shape == (B,)
    decoded = {k: v.shape for k, v in wm.decode(params, f).items()}
    assert decoded == {k: (B, p) for k, p in dims.items()}
    beliefs = filter_sequence(wm, params, key, data["obs"], data["actions"], data["mask"])
    assert beliefs.mean.shape == (B, T, latent) and np.all(np.isfinite(beliefs.cov))
    return history
