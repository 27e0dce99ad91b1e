"""Evaluation metrics against closed forms and naive references, and the figures."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Trace_ELBO

from inference import evaluation, training

# ---- R^2 ---------------------------------------------------------------------------------------


def test_r2_of_exactly_linear_targets_is_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = x @ rng.normal(size=(4, 2)) + np.array([3.0, -1.0])
    np.testing.assert_allclose(evaluation.r2_ols(x, y), 1.0, atol=1e-12)
    np.testing.assert_allclose(evaluation.r2_ols(x, y, fit_fraction=0.5), 1.0, atol=1e-12)


def test_r2_of_independent_noise_is_zero_out_of_sample():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 2))
    held_out = evaluation.r2_ols(x, y, fit_fraction=0.5)
    assert np.all(np.abs(held_out) < 0.01), held_out
    in_sample = evaluation.r2_ols(x, y)
    assert np.all((in_sample >= 0) & (in_sample < 0.01))  # E = d / (N - 1) ~ 7.5e-4


def test_r2_with_known_noise_level_and_closed_forms():
    """y = x w + eps: R^2 -> |w|^2 / (|w|^2 + s^2); in-sample R^2 = corr(y, yhat)^2 and, for one
    regressor, corr(x, y)^2."""
    rng = np.random.default_rng(2)
    n, w, s = 20000, np.array([1.0, -0.5, 0.25]), 0.8
    x = rng.normal(size=(n, 3))
    y = x @ w + s * rng.normal(size=n)
    expected = w @ w / (w @ w + s**2)
    assert abs(evaluation.r2_ols(x, y)[0] - expected) < 0.01
    assert abs(evaluation.r2_ols(x, y, fit_fraction=0.7)[0] - expected) < 0.015
    design = np.column_stack([np.ones(n), x])
    yhat = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(evaluation.r2_ols(x, y)[0], np.corrcoef(y, yhat)[0, 1] ** 2)
    np.testing.assert_allclose(
        evaluation.r2_ols(x[:, :1], y)[0], np.corrcoef(x[:, 0], y)[0, 1] ** 2
    )


def test_r2_on_sequences_holds_out_whole_sequences():
    """(N, T, d): the first sequences fit, the others score; y = x there, y = -x here."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 7, 1))
    y = np.concatenate([x[:6], -x[6:]])[..., 0]
    got = evaluation.r2_ols(x, y, fit_fraction=0.6)[0]
    x_ev, y_ev = x[6:].ravel(), y[6:].ravel()
    expected = 1 - np.sum((y_ev - x_ev) ** 2) / np.sum((y_ev - y_ev.mean()) ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert got < -2


def test_r2_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="do not match"):
        evaluation.r2_ols(x, np.zeros(9))
    with pytest.raises(ValueError, match="fit_fraction"):
        evaluation.r2_ols(x, np.zeros(10), fit_fraction=0.0)
    with pytest.raises(ValueError, match="finite"):
        evaluation.r2_ols(np.full((10, 2), np.nan), np.zeros(10))
    assert np.isnan(evaluation.r2_ols(np.arange(10.0)[:, None], np.ones(10))[0])


# ---- open-loop prediction ----------------------------------------------------------------------


def test_open_loop_mse_per_step_and_sample_averaging():
    rng = np.random.default_rng(4)
    targets = jnp.asarray(rng.normal(size=(5, 4, 3)))
    offsets = 0.1 * jnp.arange(1, 5)[None, :, None]
    out = evaluation.open_loop_mse(
        lambda p, k, b, a: targets + p * offsets, 1.0, jax.random.key(0), None, None, targets
    )
    np.testing.assert_allclose(out.per_step, (0.1 * np.arange(1, 5)) ** 2, rtol=1e-12)
    np.testing.assert_allclose(out.mse, np.mean((0.1 * np.arange(1, 5)) ** 2), rtol=1e-12)

    def noisy(params, key, belief, actions):
        return targets + jax.random.normal(key, targets.shape)

    one = evaluation.open_loop_mse(noisy, None, jax.random.key(1), None, None, targets)
    many = evaluation.open_loop_mse(
        noisy, None, jax.random.key(1), None, None, targets, num_samples=50
    )
    assert 0.6 < one.mse < 1.5 and 0.01 < many.mse < 0.03  # unit noise: E = 1 / num_samples
    with pytest.raises(ValueError, match="differ"):
        evaluation.open_loop_mse(noisy, None, jax.random.key(1), None, None, targets[:, :2])


class ToyWorldModel(NamedTuple):
    """Scalar Kalman world model: z' = a z + u + N(0, q), o = z + N(0, r), decode = 2 f + 1."""

    init_belief: object
    observe: object
    imagine: object
    features: object
    decode: object
    action_dim: int = 1
    filter_sequence: object = None


def toy_world_model(a=0.9, q=0.1, r=0.5):
    def observe(params, key, b, o, m):
        mean, var = b
        mean = mean + 0.0 * jax.random.normal(key)  # fails unless key is one key
        gain = var / (var + r)
        new = (mean + gain * (o[:, 0] - mean), (1 - gain) * var)
        return tuple(jnp.where(m, n, old) for n, old in zip(new, b, strict=True))

    def imagine(params, key, b, u):
        return (a * b[0] + u[:, 0] + 0.0 * jax.random.normal(key), a**2 * b[1] + q)

    return ToyWorldModel(
        init_belief=lambda params, B: (jnp.zeros(B), jnp.ones(B)),
        observe=observe,
        imagine=imagine,
        features=lambda params, b: b[0][:, None],
        decode=lambda params, f: 2 * f + 1,
    )


def _naive_prediction(obs, actions, context, a=0.9, q=0.1, r=0.5):
    B, T = obs.shape[:2]
    preds = np.zeros((B, T - context, 1))
    for i in range(B):
        m, v = 0.0, 1.0
        for t in range(context):
            if t:
                m, v = a * m + actions[i, t - 1, 0], a * a * v + q
            g = v / (v + r)
            m, v = m + g * (obs[i, t, 0] - m), (1 - g) * v
        for k, t in enumerate(range(context, T)):
            m = a * m + actions[i, t - 1, 0]
            preds[i, k, 0] = 2 * m + 1
    return preds


def test_world_model_open_loop_matches_a_naive_loop():
    rng = np.random.default_rng(5)
    obs, actions = rng.normal(size=(3, 9, 1)), rng.normal(size=(3, 9, 1))
    wm = toy_world_model()
    out = evaluation.world_model_open_loop_mse(wm, None, jax.random.key(0), obs, actions, context=4)
    expected = _naive_prediction(obs, actions, 4)
    np.testing.assert_allclose(out.predictions, expected, rtol=1e-10)
    np.testing.assert_allclose(out.per_step, ((expected - obs[:, 4:]) ** 2).mean(axis=(0, 2)))
    # a model's own filter_sequence is used when present
    stepwise = wm._replace(filter_sequence=lambda *args: evaluation.filter_beliefs(wm, *args))
    again = evaluation.world_model_open_loop_mse(
        stepwise, None, jax.random.key(0), obs, actions, context=4
    )
    np.testing.assert_allclose(again.predictions, expected, rtol=1e-10)
    raw = evaluation.world_model_open_loop_mse(wm, None, jax.random.PRNGKey(0), obs, actions,
                                               context=4)  # fmt: skip
    np.testing.assert_allclose(raw.predictions, expected, rtol=1e-10)
    with pytest.raises(ValueError, match="context"):
        evaluation.world_model_open_loop_mse(wm, None, jax.random.key(0), obs, actions, context=9)
    with pytest.raises(ValueError, match="decode"):
        evaluation.world_model_predict(wm._replace(decode=None))


# ---- held-out ELBO -----------------------------------------------------------------------------


def test_heldout_elbo_with_the_exact_posterior_is_the_log_likelihood():
    """z ~ N(0, 1), x_i ~ N(z_i, 1) with the exact posterior N(x_i / 2, 1 / 2) as guide: every
    particle's ELBO is log p(x) = sum_i log N(x_i; 0, 2), so the standard error is ~0."""

    def model(obs):
        with numpyro.plate("batch", obs.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("obs", dist.Normal(z, 1.0), obs=obs)

    def guide(obs):
        shift = numpyro.param("shift", 0.0)  # one parameter so that the objective has params
        with numpyro.plate("batch", obs.shape[0]):
            numpyro.sample("z", dist.Normal(obs / 2 + shift, np.sqrt(0.5)))

    obs = jnp.asarray(np.random.default_rng(6).normal(size=5))
    objective = training.elbo_objective(model, guide, Trace_ELBO())
    params, aux = objective.init(jax.random.key(0), {"obs": obs})
    out = evaluation.heldout_elbo(
        objective, params, aux, jax.random.key(1), {"obs": obs}, num_particles=4
    )
    exact = float(dist.Normal(0.0, np.sqrt(2.0)).log_prob(obs).sum())
    np.testing.assert_allclose(out["elbo"], exact, rtol=1e-10)
    np.testing.assert_allclose(out["elbo_per_sequence"], exact / 5, rtol=1e-10)
    assert out["elbo_se"] < 1e-10
    # a guide off the posterior: a lower bound with Monte Carlo spread
    off = evaluation.heldout_elbo(
        objective, {"shift": jnp.asarray(1.0)}, aux, jax.random.key(1), {"obs": obs}, 64
    )
    assert off["elbo"] < exact - 1.0 and off["elbo_se"] > 0.05


# ---- figures -----------------------------------------------------------------------------------


def test_figures_are_written(tmp_path):
    from matplotlib.image import imread

    rng = np.random.default_rng(7)
    frames = rng.uniform(size=(5, 16, 16, 1))
    grid = evaluation.save_image_grid(
        tmp_path / "grid.png", [frames, frames.reshape(5, -1)[:3] * 0.5], ["truth", "pred"],
        image_shape=(16, 16, 1), title="t",
    )  # fmt: skip
    assert imread(grid).shape[1] > imread(grid).shape[0] > 50
    traj = evaluation.plot_latent_trajectories(
        tmp_path / "traj.png", rng.normal(size=(15, 3)), rng.uniform(size=(15, 3)),
        truth=rng.normal(size=(15, 2)), truth_labels=["angle", "velocity"],
    )  # fmt: skip
    space = evaluation.plot_latent_space(
        tmp_path / "space.png", rng.normal(size=(200, 5)), rng.uniform(size=200), label="angle"
    )
    for path in (grid, traj, space):
        assert path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="image_shape"):
        evaluation.save_image_grid(tmp_path / "bad.png", [frames.reshape(5, -1)])
    with pytest.raises(ValueError, match="non-negative"):
        evaluation.plot_latent_trajectories(tmp_path / "b.png", np.zeros((3, 2)), -np.ones((3, 2)))
