"""The RSSM world model steps exactly as the RSSM model and its filtering guide do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers

from inference import training
from pssm.observations import step_observations
from rl.world_model import filter_sequence, imagine_rollout
from rl.world_models.rssm import RSSMBelief, rssm_model_and_guide, rssm_world_model

B, T, P, U = 3, 5, 4, 2


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), bool)
    mask[1, 2] = False
    return {
        "obs": rng.normal(size=(B, T, P)),
        "actions": rng.uniform(-1, 1, size=(B, T, U)),
        "rewards": rng.normal(size=(B, T)),
        "mask": mask,
    }


def _world_model():
    return rssm_world_model(P, U, stoch=3, deter=5, hidden=8)


def test_stepwise_filter_matches_guide_and_model():
    wm, batch = _world_model(), _batch()
    raw, _ = wm.objective.init(jax.random.key(0), batch)
    params = wm.objective.constrain(raw)
    svi_model, svi_guide = rssm_model_and_guide(P, U, stoch=3, deter=5, hidden=8)
    with handlers.seed(rng_seed=1):
        g = handlers.trace(handlers.substitute(svi_guide, data=params)).get_trace(**batch)
    m = handlers.trace(
        handlers.replay(handlers.seed(handlers.substitute(svi_model, data=params), 2), g)
    ).get_trace(**batch)
    z_path = np.concatenate([g["z_0"]["value"][:, None], np.moveaxis(g["z"]["value"], 0, 1)], 1)

    def loc_scale(site, t):
        fn = site["fn"]
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        sel = (lambda v: v) if site["name"] == "z_0" else (lambda v: v[t - 1])
        return np.asarray(sel(fn.loc)), np.asarray(sel(fn.scale))

    belief = wm.init_belief(params, B)
    for t in range(T):
        k = jax.random.key(10 + t)
        if t > 0:
            imagined = wm.imagine(params, k, belief, jnp.asarray(batch["actions"][:, t - 1]))
            mu, sd = loc_scale(m["z"], t)  # model prior p(z_t | h_t) on the guide's path
            eps = np.asarray(jax.random.normal(k, mu.shape))
            np.testing.assert_allclose(imagined.z, mu + sd * eps, rtol=1e-9, atol=1e-9)
            belief = imagined
        observed = wm.observe(
            params, k, belief, jnp.asarray(batch["obs"][:, t]), jnp.asarray(batch["mask"][:, t])
        )
        mu, sd = loc_scale(g["z_0"] if t == 0 else g["z"], t)
        eps = np.asarray(jax.random.normal(k, mu.shape))
        np.testing.assert_allclose(observed.z, mu + sd * eps, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(observed.h, m["h"]["value"][:, t], rtol=1e-9, atol=1e-12)
        belief = RSSMBelief(observed.h, jnp.asarray(z_path[:, t]), observed.first)
    assert not bool(belief.first.any())


def test_filter_sequence_and_rollout_shapes_and_rewards():
    wm, batch = _world_model(), _batch()
    raw, _ = wm.objective.init(jax.random.key(0), batch)
    params = wm.objective.constrain(raw)
    beliefs = jax.jit(
        lambda p, k: filter_sequence(wm, p, k, batch["obs"], batch["actions"], batch["mask"])
    )(params, jax.random.key(3))
    assert beliefs.h.shape == (B, T, 5) and beliefs.z.shape == (B, T, 3)
    start = jax.tree.map(lambda v: v[:, -1], beliefs)
    policy = lambda f, k: jnp.tanh(f[:, :U])
    f, a, r = imagine_rollout(wm, params, jax.random.key(4), start, policy, horizon=6)
    assert f.shape == (7, B, 8) and a.shape == (6, B, U) and r.shape == (6, B)
    np.testing.assert_allclose(r, wm.reward(params, f[1:]), rtol=1e-12)
    assert np.isfinite(np.asarray(f)).all()


def test_training_with_rewards_lowers_loss():
    wm = _world_model()
    rng = np.random.default_rng(0)
    # a learnable signal: rewards equal to the next observation's first coordinate
    obs = np.cumsum(rng.normal(scale=0.3, size=(16, T, P)), axis=1)
    data = {
        "obs": obs,
        "actions": rng.uniform(-1, 1, size=(16, T, U)),
        "rewards": np.concatenate([obs[:, 1:, 0], np.zeros((16, 1))], axis=1),
        "mask": np.ones((16, T), bool),
    }
    state, history = training.fit(
        wm.objective, data, optax.adam(3e-3), num_steps=60, batch_size=8,
        key=jax.random.key(0), steps_per_call=60, progress=False,
    )  # fmt: skip
    losses = np.array([h["loss"] for h in history])
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean() - 1.0


def test_step_observations_zero_unseen_entries_and_broadcast_the_mask():
    """Per-sensor masks pass through, a per-step mask covers every sensor, an unnamed array is
    the first modality, and unseen entries (NaN here) come back as zeros."""
    obs = {"a": jnp.array([[1.0, 2.0], [jnp.nan, 4.0]]), "b": jnp.full((2, 3, 2), jnp.nan)}
    clean, m = step_observations(obs, jnp.array([[True, False], [False, False]]), ["a", "b"])
    np.testing.assert_array_equal(clean["a"], [[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(clean["b"], np.zeros((2, 3, 2)))
    np.testing.assert_array_equal(m, [[True, False], [False, False]])
    clean, m = step_observations(obs, jnp.array([True, False]), ["a", "b"])
    np.testing.assert_array_equal(m, [[True, True], [False, False]])
    np.testing.assert_array_equal(clean["a"], [[1.0, 2.0], [0.0, 0.0]])
    clean, m = step_observations(obs["a"], None, ["x"])
    assert list(clean) == ["x"] and m.shape == (2, 1) and bool(m.all())
    assert np.isnan(clean["x"][1, 0])  # seen: passed on as it is
