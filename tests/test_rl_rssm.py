"""The RSSM family's world model (RSSM, MC-dropout RSSM, smoothing RSSM) steps as the RSSM
program and its guide do; sequence filtering, rollouts and training with rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers

from inference import training
from pssm.observations import step_observations
from rl.world_model import filter_sequence, imagine_rollout
from rl.world_models.rssm import RSSMBelief, rssm_parts, rssm_world_model

B, T, P, U, RATE = 3, 5, 4, 2, 0.4
SIZES = dict(stoch=3, deter=5, hidden=8)


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


def _world_model(**variant):
    return rssm_world_model(P, U, **SIZES, **variant)


def _loc_scale(site, t):
    """``(loc, scale)`` of a latent site's factor at step ``t`` (``"z_0"``: t = 0)."""
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    sel = (lambda v: v) if site["name"] == "z_0" else (lambda v: v[t - 1])
    return np.asarray(sel(fn.loc)), np.asarray(sel(fn.scale))


@pytest.mark.parametrize(
    "variant",
    [{}, {"mc_dropout": RATE}, {"smoothing": True, "backward_size": 4}],
    ids=["rssm", "mcd_rssm", "smoothing_rssm"],
)
def test_belief_step_walks_the_guides_path(variant):
    """Wiring of the RSSM family's belief step to the training programs: stepping
    ``observe``/``imagine`` over a sequence with the guide's samples substituted for ``z_t``,

    * ``imagine`` (``predict``) gives the model's ``h_t`` and draws ``z_t`` from the model's
      prior factor ``p(z_t | h_t)``, with dropout masks from its key: the program is run with
      the dropout site set to what the keys give (``U(0, 1)`` from the first half of
      ``split(k_t)``, ``eps`` from the second);
    * ``observe`` (``condition``) draws ``z_t`` from the guide's own factor: filtering guides at
      every step, the smoothing guide at the last step (only there ``b_{t+1} = 0``; the last
      action is 0, the slot the online posterior zeroes) and not before (it saw the future);
    * the belief step registers only parameter sites that training has.
    """
    wm = _world_model(**variant)
    batch = _batch()
    batch["actions"][:, -1] = 0.0
    raw, _ = wm.objective.init(jax.random.key(0), batch)
    params = wm.objective.constrain(raw)
    model, guide, _, _ = rssm_parts(P, U, **SIZES, **variant)
    with handlers.trace() as used, handlers.seed(rng_seed=0):
        model.belief_step(posterior=guide.belief_posterior)
    assert {k for k, v in used.items() if v["type"] == "param"} <= set(params)
    keys = [jax.random.key(10 + t) for t in range(T)]
    data = {}
    if variant.get("mc_dropout"):  # the site "rssm_dropout" (B, T, 8 + 8) the keys give
        noise = [jnp.zeros((B, 16))] + [
            jax.random.uniform(jax.random.split(k)[0], (B, 16)) for k in keys[1:]
        ]
        data["rssm_dropout"] = jnp.stack(noise, axis=1)
    guide_, model_ = (
        handlers.condition(handlers.substitute(f, params), data) for f in (guide, model)
    )
    g = handlers.trace(handlers.seed(guide_, 1)).get_trace(**batch)
    m = handlers.trace(handlers.replay(handlers.seed(model_, 2), g)).get_trace(**batch)
    z_path = np.concatenate([g["z_0"]["value"][:, None], np.moveaxis(g["z"]["value"], 0, 1)], 1)
    last = T - 1 if variant.get("smoothing") else 0
    belief = wm.init_belief(params, B)
    for t in range(T):
        if t > 0:
            imagined = wm.imagine(params, keys[t], belief, jnp.asarray(batch["actions"][:, t - 1]))
            np.testing.assert_allclose(imagined.h, m["h"]["value"][:, t], rtol=1e-9, atol=1e-12)
            mu, sd = _loc_scale(m["z"], t)  # the model's prior p(z_t | h_t) on the guide's path
            k_eps = jax.random.split(keys[t])[1] if variant.get("mc_dropout") else keys[t]
            eps = np.asarray(jax.random.normal(k_eps, mu.shape))
            np.testing.assert_allclose(imagined.z, mu + sd * eps, rtol=1e-9, atol=1e-9)
            belief = imagined
        k = jax.random.key(100 + t)
        observed = wm.observe(
            params, k, belief, jnp.asarray(batch["obs"][:, t]), jnp.asarray(batch["mask"][:, t])
        )
        mu, sd = _loc_scale(g["z_0"] if t == 0 else g["z"], t)
        online = observed.z - np.asarray(jax.random.normal(k, mu.shape)) * sd
        if t >= last:
            np.testing.assert_allclose(online, mu, rtol=1e-9, atol=1e-9)
        else:
            assert np.abs(online - mu).max() > 1e-3
        np.testing.assert_array_equal(observed.h, belief.h)
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
