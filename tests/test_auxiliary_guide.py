"""The auxiliary-variable model and guide (EKVAE layout) against the exact likelihood of the
composed LGSSM, which a dense joint-Gaussian reference computes independently."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO

from inference import training
from inference.guides import auxiliary
from pssm.auxiliary import auxiliary_lgssm, marginal_log_likelihood
from tests.kalman_reference import DenseModel, condition

D, PA, P, T, N = 2, 2, 3, 10, 8
A = np.array([[0.9, 0.2], [-0.15, 0.85]])
Q = np.array([[0.1, 0.02], [0.02, 0.05]])
H = np.array([[1.0, 0.3], [-0.2, 0.8]])
R = np.array([[0.2, 0.05], [0.05, 0.15]])
C = np.array([[1.0, 0.0], [0.5, 1.0], [-0.3, 0.7]])
S = 0.05 * np.eye(P)
M0, P0 = np.array([0.5, -0.2]), 0.5 * np.eye(D)


def _simulate(rng, n):
    """Ancestral sampling of (z, a, o) in NumPy."""
    z = rng.multivariate_normal(M0, P0, size=n)
    path = [z]
    for _ in range(T - 1):
        z = z @ A.T + rng.multivariate_normal(np.zeros(D), Q, size=n)
        path.append(z)
    z = np.stack(path, 1)
    a = z @ H.T + rng.multivariate_normal(np.zeros(PA), R, size=(n, T))
    return a @ C.T + rng.multivariate_normal(np.zeros(P), S, size=(n, T))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    obs = _simulate(rng, N)
    mask = rng.random((N, T)) > 0.2
    mask[:, 0] = True
    obs = jnp.asarray(np.where(mask[..., None], obs, np.nan))  # missing steps hold NaN
    model = auxiliary_lgssm(A, Q, H, R, C=C, S=S, m0=M0, P0=P0)
    exact = marginal_log_likelihood(model, {}, obs, mask=jnp.asarray(mask))
    return model, obs, jnp.asarray(mask), np.asarray(exact)


def _elbos(elbo, model, guide, params, obs, mask, n, seed=1):
    """``n`` independent ELBO estimates, in one compiled call."""
    one = lambda k: -elbo.loss(k, params, model, guide, obs, mask=mask)
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    with warnings.catch_warnings():  # mean-field site-order notice: the guide samples a first
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(jax.jit(lambda ks: jax.lax.map(one, ks))(keys))


def test_marginal_likelihood_matches_a_dense_joint_gaussian_reference(problem):
    """``H' = C H``, ``R' = C R C^T + S`` with missing steps dropped, conditioned by brute
    force on the joint Gaussian of the whole path."""
    model, obs, mask, exact = problem
    for n in range(N):
        steps = [
            (np.asarray(obs[n, t]), C @ H, C @ R @ C.T + S)
            if mask[n, t]
            else (np.zeros(0), np.zeros((0, D)), np.zeros((0, 0)))
            for t in range(T)
        ]
        dense = DenseModel(
            M0,
            P0,
            np.broadcast_to(A, (T - 1, D, D)),
            np.zeros((T - 1, D)),
            np.broadcast_to(Q, (T - 1, D, D)),
            steps,
        )
        _, _, reference = condition(dense, range(T))
        np.testing.assert_allclose(exact[n], reference, rtol=1e-9)


def test_sites_shapes_predictive_and_jit(problem):
    model, obs, mask, _ = problem
    guide = auxiliary(model, hidden=(8,))
    meta = {}

    @jax.jit
    def traces(key):
        gtr = handlers.trace(handlers.seed(guide, key)).get_trace(obs, mask=mask)
        replayed = handlers.replay(handlers.seed(model, key), gtr)
        mtr = handlers.trace(replayed).get_trace(obs, mask=mask)
        meta["guide"] = {k: v["type"] for k, v in gtr.items()}
        meta["observed"] = {k: v["is_observed"] for k, v in mtr.items() if v["type"] == "sample"}
        # per-step log-densities: (B,) site -> (B, T) of its masked base distribution
        per_step = lambda tr, k: tr[k]["fn"].base_dist.log_prob(tr[k]["value"])
        return (
            {k: gtr[k]["value"] for k in ("a", "z_0", "z")},
            mtr["a"]["value"],
            {"q(a)": per_step(gtr, "a"), "p(a)": per_step(mtr, "a"), "p(o)": per_step(mtr, "obs")},
        )

    values, model_a, per_step = traces(jax.random.PRNGKey(0))
    assert values["a"].shape == (N, T, PA)
    assert values["z_0"].shape == (N, D) and values["z"].shape == (T - 1, N, D)
    assert meta["guide"]["aux_encoder$params"] == "param"
    assert np.all(np.isfinite(values["a"]))  # also at the missing (NaN) steps
    # the model replayed on the guide's sample: latent "a" and "z", observed "obs"
    assert meta["observed"] == {"z_0": False, "z": False, "a": False, "obs": True}
    np.testing.assert_array_equal(model_a, values["a"])
    # masked steps contribute neither a nor o: their log-densities are zero in model and guide
    missing = ~np.asarray(mask)
    for name, lp in per_step.items():
        assert np.all(np.asarray(lp)[missing] == 0) and np.all(np.asarray(lp)[~missing] != 0), name
    sites = ["a", "z_0", "z", "obs"]
    pred = Predictive(model, guide=guide, num_samples=3, return_sites=sites)
    pred = pred(jax.random.PRNGKey(2), obs, mask=mask)
    assert pred["a"].shape == (3, N, T, PA) and pred["z"].shape == (3, T - 1, N, D)
    assert pred["z_0"].shape == (3, N, D) and pred["obs"].shape == (3, N, T, P)


@pytest.fixture(scope="module")
def trained(problem):
    """The encoder fitted by ``inference.training.fit`` (model parameters fixed at the truth)."""
    model, obs, mask, exact = problem
    guide = auxiliary(model, hidden=(16,))
    objective = training.elbo_objective(model, guide, Trace_ELBO(num_particles=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state, history = training.fit(
            objective,
            {"obs": obs, "mask": mask},
            optax.adam(2e-2),
            num_steps=600,
            batch_size=N,
            key=jax.random.PRNGKey(0),
            steps_per_call=600,
            progress=False,
        )
    return guide, objective.constrain(state.params), history


def test_training_the_encoder_brings_the_elbo_up_to_the_exact_value(problem, trained):
    model, obs, mask, exact = problem
    guide, params, history = trained
    initial = np.mean([h["elbo"] for h in history[:5]])  # at (nearly) the initial encoder
    final = _elbos(Trace_ELBO(num_particles=4), model, guide, params, obs, mask, 50)
    initial_gap, final_gap = exact.sum() - initial, exact.sum() - final.mean()
    assert initial_gap > 50  # an untrained encoder is far off
    assert final_gap < 0.05 * initial_gap
    # what is left is KL(q(a | o) || p(a | o)) of a per-step (factorised, amortised) encoder
    # against a posterior correlated over time: ~0.07 nats per observed step here (4.3 nats after
    # 3000 steps, 6.0 after these 600)
    assert final_gap < 0.15 * int(mask.sum())


@pytest.mark.parametrize(
    "elbo",
    [Trace_ELBO(num_particles=8), TraceMeanField_ELBO(num_particles=4)],
    ids=["trace-8", "meanfield-4"],
)
def test_every_elbo_is_below_the_exact_log_likelihood(problem, trained, elbo):
    """E_q[ELBO] = log p(o) - KL(q(a | o) || p(a | o)): at the trained encoder the gap is small,
    so the bound is tested close to where it could be violated."""
    model, obs, mask, exact = problem
    guide, params, _ = trained
    values = _elbos(elbo, model, guide, params, obs, mask, 100, seed=7)
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert values.mean() <= exact.sum() + 3 * se
    assert exact.sum() - values.mean() < 0.15 * int(mask.sum())  # tight-ish: could fail


def test_learned_latent_parameters_are_shared_and_get_gradients(problem):
    model_l = auxiliary_lgssm(
        A, Q, H, R, C=C, S=S, m0=M0, P0=P0, learn=("A", "C", "S"), S_form="isotropic"
    )
    _, obs, mask, _ = problem
    guide = auxiliary(model_l, hidden=(8,))
    sites = {}

    def elbo(params):
        for name, program in (("guide", guide), ("model", model_l)):
            tr = handlers.trace(handlers.seed(program, 0)).get_trace(obs, mask=mask)
            sites[name] = {k for k, v in tr.items() if v["type"] == "param"}
        return -Trace_ELBO().loss(jax.random.PRNGKey(1), params, model_l, guide, obs, mask=mask)

    params = {"A": jnp.asarray(A), "C": jnp.asarray(C), "S": jnp.asarray(0.05)}
    grads = jax.jit(jax.grad(elbo))(params)
    assert sites["guide"] == {"A", "aux_encoder$params"}  # the latent LGSSM's, and the encoder
    assert sites["model"] == {"A", "C", "S"}
    for name in ("A", "C", "S"):
        assert np.all(np.isfinite(grads[name])) and np.abs(grads[name]).max() > 0
    # the exact likelihood reads the learned values
    log_lik = jax.jit(lambda v: marginal_log_likelihood(model_l, v, obs, mask=mask))
    assert not np.allclose(log_lik(params), log_lik({**params, "S": params["S"] * 2}))


def test_mlp_decoder_trains_and_has_no_exact_likelihood(problem):
    _, obs, mask, _ = problem
    model = auxiliary_lgssm(A, Q, H, R, decoder="mlp", obs_dim=P, hidden=(8,), S=S)
    guide = auxiliary(model, hidden=(8,))
    objective = training.elbo_objective(model, guide, Trace_ELBO())
    state, history = training.fit(
        objective,
        {"obs": obs, "mask": mask},
        optax.adam(1e-2),
        num_steps=100,
        batch_size=N,
        key=jax.random.PRNGKey(0),
        steps_per_call=100,
        progress=False,
    )
    assert {"decoder$params", "aux_encoder$params"} == set(state.params)
    early = np.mean([h["elbo"] for h in history[:10]])
    late = np.mean([h["elbo"] for h in history[-10:]])
    assert late > early + 10  # decoder and encoder learn
    assert not hasattr(model, "marginal_structure")
    with pytest.raises(ValueError, match="no marginal_structure"):
        marginal_log_likelihood(model, {}, obs)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="needs C"):
        auxiliary_lgssm(A, Q, H, R)
    with pytest.raises(ValueError, match="needs obs_dim"):
        auxiliary_lgssm(A, Q, H, R, decoder="mlp")
    with pytest.raises(ValueError, match="unknown parameters"):
        auxiliary_lgssm(A, Q, H, R, C=C, learn=("X",))
    with pytest.raises(TypeError, match="auxiliary_site"):
        from pssm.lgssm import lgssm

        auxiliary(lgssm(A, Q, H, R))
