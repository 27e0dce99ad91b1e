"""The runnable examples, at small sizes: each is also a smoke test with real assertions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import Trace_ELBO

from examples import kalman_demo, new_model_tutorial
from inference import compare, guides, kalman
from rl import runner
from rl.config import RunConfig
from rl.models import build
from rl.world_model import filter_sequence


def test_kalman_demo_fuses_sensors_and_smoothing_beats_filtering(tmp_path):
    out = kalman_demo.main(["--steps", "200", "--out", str(tmp_path)])
    assert out["rmse_smoothed"] < out["rmse_filtered"] < out["rmse_raw"]
    assert 0.85 < out["coverage_smoothed"] <= 1.0 and 0.85 < out["coverage_filtered"] <= 1.0
    assert out["sequential_vs_parallel"] < 1e-3
    assert (tmp_path / "kalman_demo.png").stat().st_size > 10_000


def test_new_model_tutorial_trains_every_guide_family(tmp_path):
    rows = new_model_tutorial.main(
        ["--steps", "60", "--sequences", "48", "--length", "12", "--out", str(tmp_path)]
    )
    by_guide = {r["guide"]: r for r in rows}
    assert set(by_guide) == {"kalman_smoothing", "backward_sampling", "filtering"}
    for r in rows:
        assert np.isfinite(r["elbo_mean"]) and np.isclose(r["elbo_mean"], r["recon"] - r["kl"])
    assert by_guide["filtering"]["train_elbo"] > by_guide["filtering"]["elbo_mean"] - 1e3


def test_tutorial_model_kalman_guides_are_one_posterior():
    """At the same parameters the forward- and backward-factorised Kalman posteriors are one
    distribution, so under Trace_ELBO their estimates agree within Monte Carlo error."""
    data, _ = new_model_tutorial.simulate(8, 10)
    rows = compare.compare(
        new_model_tutorial.pendulum_model,
        guides={"smoothing": guides.kalman_smoothing, "backward": guides.backward_sampling},
        elbos={"trace": Trace_ELBO()},
        data=data,
        train=False,
        eval_particles=64,
    )
    a, b = rows
    assert abs(a["elbo_mean"] - b["elbo_mean"]) < 4 * np.hypot(a["elbo_se"], b["elbo_se"])


def test_tutorial_belief_step_is_the_kalman_filter_of_its_structure():
    """Section 5: with every step observed, stepping the belief gives the Kalman filter of the
    structure the guides train on (float32 tolerances)."""
    wm = build("examples.new_model_tutorial:world_model", 3, 1, {}, seed=0)
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    actions = jnp.asarray(rng.normal(size=(2, 6, 1)), jnp.float32)
    batch = {"obs": obs, "actions": actions, "mask": jnp.ones((2, 6)), "rewards": jnp.zeros((2, 6))}
    params = wm.objective.constrain(wm.objective.init(jax.random.key(0), batch)[0])
    stepped = filter_sequence(wm, params, jax.random.key(1), obs, actions)
    model, _ = new_model_tutorial.world_model(3, 1)
    with numpyro.handlers.substitute(data=params):
        s = model.structure(obs, actions)
    ref = jax.vmap(kalman.filter)(*s).filtered
    np.testing.assert_allclose(stepped.z.mean, ref.mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stepped.z.cov, ref.cov, rtol=1e-4, atol=1e-5)


def test_tutorial_world_model_acts_on_pendulum_swingup(tmp_path):
    """Section 5 at a tiny size: SAC on the tutorial model's belief trains and acts through the
    runner on pendulum-swingup (one 125-step episode at action repeat 8, trained at step 100)."""
    tiny = (("hidden", 16), ("batch_size", 16), ("model_batch", 4), ("seq_len", 8))
    cfg = RunConfig(agent="sac-belief", model="examples.new_model_tutorial:world_model",
                    task="pendulum-swingup", variant=None, action_repeat=8, env_steps=1000,
                    prefill_steps=100, train_every=50, updates=2, eval_every=10**9,
                    eval_episodes=1, checkpoint_every=10**9, overrides=tiny)  # fmt: skip
    summary = runner.run(cfg, tmp_path, progress=False, video=False, compilation_cache=False)
    assert np.isfinite(summary["final_eval_return"]) and np.isfinite(summary["random_return"])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "model_loss" in r]
    assert train and all(np.isfinite(r["model_loss"]) for r in train)
