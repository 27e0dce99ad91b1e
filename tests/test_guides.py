"""Guide families on the textbook LGSSM, where the exact answer is known."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.util import log_density

from inference import kalman
from inference.guides import backward_sampling, closed_form_filtering, kalman_smoothing
from pssm.core import exact_log_likelihood, model_prior_conditionals
from pssm.lgssm import lgssm

D, P, T, B = 2, 3, 12, 3


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    A = np.array([[0.9, 0.2], [-0.15, 0.85]])
    Q = np.array([[0.1, 0.02], [0.02, 0.05]])
    H = rng.normal(size=(P, D))
    R = 0.3 * np.eye(P) + 0.05
    Bc = rng.normal(size=(D, 1))
    model = lgssm(A, Q, H, R, B=Bc, m0=np.array([0.5, -0.2]), P0=0.5 * np.eye(D))
    actions = rng.normal(size=(B, T, 1))
    z = rng.multivariate_normal([0.5, -0.2], 0.5 * np.eye(D), size=B)
    ys = []
    for t in range(T):  # ancestral simulation of the model, independently of its code
        ys.append(z @ H.T + rng.multivariate_normal(np.zeros(P), R, size=B))
        z = z @ A.T + actions[:, t] @ Bc.T + rng.multivariate_normal(np.zeros(D), Q, size=B)
    mask = jnp.asarray(rng.random((B, T)) > 0.25)
    obs = jnp.where(mask[..., None], jnp.asarray(np.stack(ys, 1)), jnp.nan)  # NaN where missing
    actions = jnp.asarray(actions)
    exact = exact_log_likelihood(model, {}, obs, actions, mask)
    return model, obs, actions, mask, exact


def _elbos(elbo, model, guide, obs, actions, mask, n):
    loss = jax.jit(lambda k: -elbo.loss(k, {}, model, guide, obs, actions, mask))
    return np.array([loss(k) for k in jax.random.split(jax.random.PRNGKey(1), n)])


@pytest.mark.parametrize(
    "family",
    [kalman_smoothing, backward_sampling, partial(kalman_smoothing, parallel=True)],
    ids=["smoothing", "backward", "smoothing-parallel"],
)
def test_exact_posterior_guides_give_the_exact_log_likelihood_at_every_sample(problem, family):
    model, obs, actions, mask, exact = problem
    values = _elbos(Trace_ELBO(), model, family(model), obs, actions, mask, 4)
    np.testing.assert_allclose(values, float(exact.sum()), rtol=1e-10)


def test_mean_field_elbo_of_the_smoothing_guide_is_unbiased(problem):
    """Per-step analytic KL at one sampled previous state (the VRKN bound) averages to
    log p(o) when the guide is the exact posterior."""
    model, obs, actions, mask, exact = problem
    values = _elbos(TraceMeanField_ELBO(), model, kalman_smoothing(model), obs, actions, mask, 400)
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean() - float(exact.sum())) < 4 * se
    assert values.std() > 0.1  # genuinely Monte Carlo (the test could fail)


def test_filtering_bound_is_below_the_exact_log_likelihood(problem):
    model, obs, actions, mask, exact = problem
    guide = closed_form_filtering(model)
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        values = _elbos(elbo, model, guide, obs, actions, mask, 200)
        se = values.std(ddof=1) / np.sqrt(len(values))
        assert values.mean() < float(exact.sum()) - 4 * se  # strictly worse: it ignores the future


def test_backward_sampling_guide_draws_the_exact_posterior(problem):
    model, obs, actions, mask, _ = problem
    guide = backward_sampling(model)
    draws = Predictive(guide, num_samples=4000)(jax.random.PRNGKey(3), obs, actions, mask)
    z = np.concatenate([np.asarray(draws["z_0"])[:, :, None], np.moveaxis(draws["z"], 1, 2)], 2)
    s = model.structure(obs, actions, mask)
    post = jax.vmap(kalman.smoother)(*s)
    mean = z.mean(0)  # (B, T, d)
    se = z.std(0) / np.sqrt(len(z))
    assert np.all(np.abs(mean - post.smoothed.mean) < 5 * se)
    var = z.var(0)
    np.testing.assert_allclose(var, jnp.diagonal(post.smoothed.cov, axis1=-2, axis2=-1), rtol=0.12)
    cross = np.mean((z[:, :, :-1, 0] - mean[:, :-1, 0]) * (z[:, :, 1:, 0] - mean[:, 1:, 0]), 0)
    np.testing.assert_allclose(cross, post.cross_cov[..., 0, 0], atol=0.02)


def test_loop_and_scan_written_models_have_the_same_log_joint(problem):
    model, obs, actions, mask, _ = problem
    s = model.structure(obs, actions, mask)

    def loop_model(obs, actions, mask):
        A, Q, H, R = s.dynamics.A[0], s.dynamics.Q[0], s.emissions.H[0], s.emissions.R[0]
        with numpyro.plate("batch", B):
            z = numpyro.sample("z_0", dist.MultivariateNormal(s.prior.mean, s.prior.cov))
            for t in range(T):
                if t > 0:
                    z = numpyro.sample(
                        f"z_{t}", dist.MultivariateNormal(z @ A.T + s.dynamics.b[:, t - 1], Q)
                    )
                o = jnp.where(mask[:, t, None], obs[:, t], 0.0)
                with handlers.mask(mask=mask[:, t]):
                    numpyro.sample(f"o_{t}", dist.MultivariateNormal(z @ H.T, R), obs=o)

    z = Predictive(model, num_samples=1)(jax.random.PRNGKey(5), obs, actions, mask)
    values = {"z_0": z["z_0"][0], "z": z["z"][0]}
    scan_lp, _ = log_density(model, (obs, actions, mask), {}, values)
    loop_values = {"z_0": values["z_0"], **{f"z_{t}": values["z"][t - 1] for t in range(1, T)}}
    loop_lp, _ = log_density(loop_model, (obs, actions, mask), {}, loop_values)
    np.testing.assert_allclose(scan_lp, loop_lp, rtol=1e-12)


def test_guides_work_with_particles_predictive_and_handlers(problem):
    model, obs, actions, mask, exact = problem
    guide = kalman_smoothing(model)
    many = Trace_ELBO(num_particles=5).loss(
        jax.random.PRNGKey(0), {}, model, guide, obs, actions, mask
    )
    np.testing.assert_allclose(-many, exact.sum(), rtol=1e-10)
    pred = Predictive(model, guide=guide, num_samples=7)(jax.random.PRNGKey(1), obs, actions, mask)
    assert pred["obs"].shape == (7, B, T, P)
    tr = handlers.trace(handlers.seed(guide, 0)).get_trace(obs, actions, mask)
    assert tr["z_0"]["value"].shape == (B, D) and tr["z"]["value"].shape == (T - 1, B, D)
    # conditioning the model on the guide's path changes nothing but the latent values
    cond = handlers.condition(model, {"z_0": tr["z_0"]["value"], "z": tr["z"]["value"]})
    mtr = handlers.trace(handlers.seed(cond, 1)).get_trace(obs, actions, mask)
    assert mtr["z"]["is_observed"] and np.allclose(mtr["z"]["value"], tr["z"]["value"])


def test_learned_parameters_are_shared_between_model_and_guide():
    A = np.array([[0.8]])
    model = lgssm(
        A, 0.1 * np.eye(1), np.eye(1), 0.2 * np.eye(1), learn=("A", "Q"), Q_form="isotropic"
    )
    obs = jnp.ones((2, 5, 1))
    guide = kalman_smoothing(model)
    gtr = handlers.trace(handlers.seed(guide, 0)).get_trace(obs)
    mtr = handlers.trace(handlers.seed(model, 0)).get_trace(obs)
    assert {"A", "Q"} <= {k for k, v in gtr.items() if v["type"] == "param"}
    assert {"A", "Q"} <= {k for k, v in mtr.items() if v["type"] == "param"}
    # the ELBO's gradient w.r.t. A flows through both (non-zero, finite)
    import optax
    from numpyro.infer import SVI

    svi = SVI(model, guide, optax.sgd(0.0), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), obs)
    params = svi.get_params(state)
    grad = jax.grad(
        lambda a: Trace_ELBO().loss(jax.random.PRNGKey(0), {**params, "A": a}, model, guide, obs)
    )(params["A"])
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(obs=jnp.ones((2, 5, 4))), "obs has shape"),
        (dict(actions=jnp.ones((2, 4, 1))), "actions have shape"),
        (dict(mask=jnp.ones((2, 4), bool)), "mask has shape"),
        (dict(obs=jnp.full((2, 5, 3), jnp.nan)), "NaN"),
    ],
)
def test_bad_inputs_fail_before_training(bad, match):
    model = lgssm(np.eye(2) * 0.9, 0.1 * np.eye(2), np.ones((3, 2)), np.eye(3), B=np.ones((2, 1)))
    args = dict(obs=jnp.ones((2, 5, 3)), actions=jnp.ones((2, 5, 1)), mask=None) | bad
    with pytest.raises(ValueError, match=match):
        kalman_smoothing(model)(**args)


def test_fully_analytic_smoothing_bound_is_tight(problem):
    """Closed form of the VRKN smoothing bound with every expectation analytic:
    sum_t E_q log p(o_t|z_t) - KL(q(z_0)||p(z_0)) - sum_t E_q KL(q(z_{t+1}|z_t)||p(z_{t+1}|z_t)),
    which for the exact posterior equals log p(o) to rounding error."""
    model, obs, actions, mask, exact = problem
    s = model.structure(obs, actions, mask)
    post = jax.vmap(kalman.smoother)(*s)
    _, dyn = model_prior_conditionals(s)
    kl_steps = jax.vmap(kalman.expected_kl)(post, dyn)  # (B, T-1)
    m, Pc = post.smoothed
    Bn, Tn = m.shape[:2]
    H = jnp.broadcast_to(s.emissions.H[:, None], (Bn, Tn, P, D))
    R = jnp.broadcast_to(s.emissions.R[:, None], (Bn, Tn, P, P))
    o = jnp.where(mask[..., None], obs, 0.0)
    recon = jax.vmap(
        jax.vmap(
            lambda o, m, P, H, R: (
                dist.MultivariateNormal(H @ m, R).log_prob(o)
                - 0.5 * jnp.trace(jnp.linalg.solve(R, H @ P @ H.T))
            )
        )
    )(o, m, Pc, H, R)
    m0, P0 = s.prior
    kl0 = jax.vmap(
        lambda a, b, c, d: dist.kl_divergence(
            dist.MultivariateNormal(a, b), dist.MultivariateNormal(c, d)
        )
    )(m[:, 0], Pc[:, 0], m0, P0)
    elbo = jnp.sum(jnp.where(mask, recon, 0.0)) - jnp.sum(kl0) - jnp.sum(kl_steps)
    np.testing.assert_allclose(elbo, exact.sum(), rtol=1e-10)
