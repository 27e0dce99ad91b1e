"""Sequences of one step, masks that are not 0/1, and the value checks under ``jit``
(``inference.kalman.checked``), for the Kalman kernels and the models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.util import log_density
from scipy import stats

from examples.lvssf_pendulum import A_TRUE, B_TRUE
from inference import kalman
from inference.guides import backward_sampling, closed_form_filtering, kalman_smoothing
from pssm.auxiliary import auxiliary_lgssm, marginal_log_likelihood
from pssm.core import exact_log_likelihood
from pssm.kalmamba import kalmamba
from pssm.lgssm import lgssm
from pssm.locally_linear import locally_linear
from pssm.lvssf import lvssf
from pssm.rssm import rssm
from pssm.vrkn import vrkn
from tests.kalman_reference import DenseModel, condition

M0 = np.array([0.5, -0.2])
P0 = np.array([[0.6, 0.1], [0.1, 0.4]])
A = np.array([[0.9, 0.2], [-0.15, 0.85]])
Q = np.array([[0.1, 0.02], [0.02, 0.05]])
H = np.array([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
R = np.array([[0.3, 0.05, 0.0], [0.05, 0.2, 0.0], [0.0, 0.0, 0.4]])


def dense_model(w, R=R, mask=None, P0=P0):
    return (
        kalman.Gaussian(jnp.asarray(M0), jnp.asarray(P0)),
        kalman.Dynamics(jnp.asarray(A), None, jnp.asarray(Q)),
        kalman.Emissions(w, R, mask, jnp.asarray(H)),
    )


P0_DIAG = np.array([0.6, 0.4])


def diagonal_model(w, R, mask=None, P0=P0_DIAG):
    return (
        kalman.Gaussian(jnp.asarray(M0), jnp.asarray(P0)),
        kalman.Dynamics(jnp.array([0.9, 0.8]), None, jnp.array([0.1, 0.05])),
        kalman.Emissions(w, R, mask),
    )


# --- T = 1: the Kalman kernels ---------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_one_step_dense_filter_and_smoother_are_the_conjugate_update(parallel):
    """With T = 1 there is no transition: log p(w_0) = log N(w_0; H m0, H P0 H^T + R), the
    filtered and smoothed beliefs are the conjugate posterior, nothing lives between steps."""
    w = np.array([[0.1, 0.2, -0.3]])
    S = H @ P0 @ H.T + R
    K = P0 @ H.T @ np.linalg.inv(S)
    mean, cov = M0 + K @ (w[0] - H @ M0), P0 - K @ S @ K.T
    post = kalman.smoother(*dense_model(jnp.asarray(w)), parallel=parallel)
    filt = kalman.filter(*dense_model(jnp.asarray(w)), parallel=parallel)
    reference = stats.multivariate_normal(H @ M0, S).logpdf(w[0])
    np.testing.assert_allclose(filt.log_likelihood, reference, rtol=1e-12)
    np.testing.assert_allclose(filt.log_likelihoods, [reference], rtol=1e-12)
    np.testing.assert_allclose(post.log_likelihood, reference, rtol=1e-12)
    for belief in (filt.filtered, post.smoothed):
        np.testing.assert_allclose(belief.mean[0], mean, rtol=1e-12)
        np.testing.assert_allclose(belief.cov[0], cov, rtol=1e-12)
    np.testing.assert_allclose(filt.predicted.mean[0], M0)
    assert post.cross_cov.shape == (0, 2, 2) and post.backward.A.shape == (0, 2, 2)
    # sampling the posterior of one step: z_0 ~ N(mean, cov), scored by that density
    z, log_q = kalman.posterior_sample(jax.random.key(0), post, parallel=parallel)
    assert z.shape == (1, 2)
    np.testing.assert_allclose(log_q, stats.multivariate_normal(mean, cov).logpdf(z[0]), rtol=1e-10)
    assert kalman.expected_kl(post, dense_model(w)[1]).shape == (0,)


@pytest.mark.parametrize("parallel", [False, True])
def test_one_step_diagonal_with_two_sensors_and_a_masked_entry(parallel):
    """Per coordinate, the observed sensors of the one step are jointly Gaussian with
    covariance P0 11^T + diag(R); the masked entry (NaN) carries nothing."""
    w = np.array([[[0.3, -0.4], [0.1, np.nan]]])  # (T=1, K=2, d=2)
    Rd = np.array([[0.2, 0.3], [0.5, 0.4]])
    mask = np.array([[[True, True], [True, False]]])
    P0d = P0_DIAG
    reference = 0.0
    for i in range(2):
        seen = mask[0, :, i]
        ws, rs = w[0, seen, i], Rd[seen, i]
        cov = P0d[i] * np.ones((len(ws), len(ws))) + np.diag(rs)
        reference += stats.multivariate_normal(np.full(len(ws), M0[i]), cov).logpdf(ws)
    post = kalman.smoother(*diagonal_model(jnp.asarray(w), Rd, mask, P0d), parallel=parallel)
    np.testing.assert_allclose(post.log_likelihood, reference, rtol=1e-12)
    precision = 1 / P0d + np.where(mask[0], 1 / Rd, 0.0).sum(0)
    mean = (M0 / P0d + np.where(mask[0], np.nan_to_num(w[0]) / Rd, 0.0).sum(0)) / precision
    np.testing.assert_allclose(post.smoothed.cov[0], 1 / precision, rtol=1e-12)
    np.testing.assert_allclose(post.smoothed.mean[0], mean, rtol=1e-12)


def test_one_fully_masked_step_is_the_prior():
    w = jnp.full((1, 3), jnp.nan)
    res = kalman.smoother(*dense_model(w, mask=jnp.zeros(1, bool)))
    assert float(res.log_likelihood) == 0.0
    np.testing.assert_allclose(res.smoothed.mean[0], M0)
    np.testing.assert_allclose(res.smoothed.cov[0], P0)


# --- T = 1: the models -----------------------------------------------------------------------


def test_one_step_lgssm_elbo_is_the_closed_form_log_likelihood():
    """Every exact-posterior guide gives log N(o_0; H m0, H P0 H^T + R) per sequence at every
    sample; a sequence whose one step is masked contributes 0. The path is z_0 alone."""
    model = lgssm(A, Q, H, R, m0=M0, P0=P0, B=np.ones((2, 1)))
    obs = jnp.array([[[0.1, 0.2, -0.3]], [[1.0, -0.5, 0.4]], [[np.nan] * 3]])
    actions, mask = jnp.ones((3, 1, 1)), jnp.array([[True], [True], [False]])
    S = H @ P0 @ H.T + R
    reference = [stats.multivariate_normal(H @ M0, S).logpdf(o[0]) for o in obs[:2]] + [0.0]
    exact = exact_log_likelihood(model, {}, obs, actions, mask)
    np.testing.assert_allclose(exact, reference, rtol=1e-12)
    guides = {
        "smoothing": kalman_smoothing(model),
        "smoothing-parallel": kalman_smoothing(model, parallel=True),
        "backward": backward_sampling(model),
        "filtering": closed_form_filtering(model),  # = the smoothing posterior at T = 1
    }
    for name, guide in guides.items():
        for seed in range(2 if name == "smoothing" else 1):
            elbo = -Trace_ELBO().loss(jax.random.key(seed), {}, model, guide, obs, actions, mask)
            np.testing.assert_allclose(elbo, sum(reference), rtol=1e-12, err_msg=name)
        tr = handlers.trace(handlers.seed(guide, 0)).get_trace(obs, actions, mask)
        assert tr["z_0"]["value"].shape == (3, 2) and "z" not in tr
    # the mean-field ELBO (analytic KL of z_0, one-sample reconstruction) averages to it
    mf = jax.jit(
        jax.vmap(
            lambda k: (
                -TraceMeanField_ELBO().loss(k, {}, model, guides["smoothing"], obs, actions, mask)
            )
        )
    )(jax.random.split(jax.random.key(3), 400))
    assert abs(mf.mean() - sum(reference)) < 4 * mf.std() / np.sqrt(len(mf))


def test_one_step_auxiliary_lgssm_is_the_closed_form_marginal():
    C = np.array([[1.0, 0.0], [0.5, 1.0], [-0.3, 0.7]])
    Sa = 0.05 * np.eye(3)
    Ha, Ra = np.array([[1.0, 0.3], [-0.2, 0.8]]), np.array([[0.2, 0.05], [0.05, 0.15]])
    model = auxiliary_lgssm(A, Q, Ha, Ra, C=C, S=Sa, m0=M0, P0=P0)
    obs = jnp.array([[[0.3, -0.1, 0.2]], [[-1.0, 0.4, 0.0]]])
    cov = C @ (Ha @ P0 @ Ha.T + Ra) @ C.T + Sa
    reference = [stats.multivariate_normal(C @ Ha @ M0, cov).logpdf(o[0]) for o in obs]
    np.testing.assert_allclose(marginal_log_likelihood(model, {}, obs), reference, rtol=1e-12)


DIMS = {"a": 2, "b": 3}
_MAMBA = dict(hidden=6, d_model=4, pre_layers=1, num_blocks=1, d_state=3, d_conv=2, dropout=0.0)
LVSSF = dict(
    A=A_TRUE, B=B_TRUE, prior_cov=np.eye(2), Sigma_w=1e-3 * np.eye(2),
    linear_sensors={"angle": np.array([[1.0, 0.0]])}, hidden=8,
)  # fmt: skip
FAMILIES = {  # name: (constructor, modalities)
    "locally_linear": (lambda: locally_linear(DIMS, 2, action_dim=1, hidden=4), DIMS),
    "vrkn": (lambda: vrkn(DIMS, 1, latent_dim=3, hidden=4, mlp_hidden=4, mc_dropout=False), DIMS),
    "kalmamba": (lambda: kalmamba(DIMS, 2, 1, **_MAMBA), DIMS),
    "kalmamba-sequential": (lambda: kalmamba(DIMS, 2, 1, parallel=False, **_MAMBA), DIMS),
    "rssm": (lambda: rssm(DIMS, 1, stoch=2, deter=3, hidden=4), DIMS),
    "lvssf": (lambda: lvssf(36, **LVSSF), {"image": 36, "angle": 1}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_step_log_joint_is_two_steps_with_the_second_unseen_minus_its_transition(family):
    """The T = 1 program against the T >= 2 one (tested elsewhere): with step 1 masked, its
    observations score nothing, so log p(o_0, z_0) at T = 1 must equal log p(o_0, z_0, z_1)
    at T = 2 less the transition's log p(z_1 | z_0) (step 0's dynamics see o_0, a_0 only)."""
    build, dims = FAMILIES[family]
    model = build()
    rng = np.random.default_rng(0)
    B = 2
    obs = {k: rng.normal(size=(B, 2, p)) for k, p in dims.items()}
    actions = rng.normal(size=(B, 2, 1))
    mask = np.ones((B, 2, len(dims)), bool)
    mask[:, 1] = False
    mask[1, 0, 0] = False  # a missing sensor at the one step too
    z0 = jnp.asarray(rng.normal(size=(B, model.latent_dim)))
    z1 = jnp.asarray(rng.normal(size=(1, B, model.latent_dim)))
    two, tr = log_density(model, (obs, actions, mask), {}, {"z_0": z0, "z": z1})
    transition = jnp.sum(tr["z"]["fn"].log_prob(tr["z"]["value"]))
    first = {k: o[:, :1] for k, o in obs.items()}
    one, tr1 = log_density(model, (first, actions[:, :1], mask[:, :1]), {}, {"z_0": z0})
    assert "z" not in tr1
    np.testing.assert_allclose(one, two - transition, rtol=1e-10)
    if hasattr(model, "structure"):  # and a Kalman guide of its latent LGSSM gives an ELBO
        guide = backward_sampling(model)
        elbo = Trace_ELBO().loss(jax.random.key(0), {}, model, guide, first, actions[:, :1])
        assert np.isfinite(elbo)


# --- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, np.nan])
def test_a_mask_that_is_not_0_1_is_an_error(bad):
    w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))
    mask = np.ones(4)
    mask[2] = bad
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        kalman.filter(*dense_model(w, mask=mask))
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        kalman.filter(*diagonal_model(w[:, :2], np.ones(2), mask))
    sensor = kalman.Emissions(w[:, :2], np.eye(2), mask, np.eye(2))
    with pytest.raises(ValueError, match=r"sensors\[1\].mask must be boolean or 0/1"):
        kalman.stack_sensors([kalman.Emissions(w[:, 2:], np.eye(1), None, np.ones((1, 2))), sensor])
    model = lgssm(A, Q, H, R)
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        exact_log_likelihood(model, {}, w[None], mask=mask[None])
    deep = locally_linear(3, 2, hidden=4)
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        handlers.seed(deep, 0)(w[None], mask=mask[None])


def test_masks_of_0_1_floats_or_integers_are_the_boolean_mask():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(5, 3)))
    flags = np.array([True, False, True, True, False])
    reference = kalman.filter(*dense_model(w, mask=flags)).log_likelihood
    for mask in (
        flags.astype(float),
        flags.astype(np.int32),
        jnp.asarray(flags, jnp.float32),
        [1, 0, 1, 1, 0],
    ):
        np.testing.assert_array_equal(
            kalman.filter(*dense_model(w, mask=mask)).log_likelihood, reference
        )
    # the reference: the observed steps' joint Gaussian (steps 1 and 4 dropped)
    steps = [
        (np.asarray(w[t]), H, R) if flags[t] else (np.zeros(0), np.zeros((0, 2)), np.zeros((0, 0)))
        for t in range(5)
    ]
    dense = DenseModel(
        M0,
        P0,
        np.broadcast_to(A, (4, 2, 2)),
        np.zeros((4, 2)),
        np.broadcast_to(Q, (4, 2, 2)),
        steps,
    )
    np.testing.assert_allclose(reference, condition(dense, range(5))[2], rtol=1e-10)


# --- the checked mode ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loglik():
    """A jitted dense log-likelihood of (w, R, mask, P0), and the same through checked."""
    f = jax.jit(lambda w, R, mask, P0: kalman.filter(*dense_model(w, R, mask, P0)).log_likelihood)
    return f, kalman.checked(f)


def test_checked_passes_clean_inputs_with_identical_results(loglik):
    f, checked = loglik
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 3))
    w[2] = np.nan  # masked: may hold anything
    mask = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    args = (jnp.asarray(w), jnp.asarray(R), jnp.asarray(mask), jnp.asarray(P0))
    np.testing.assert_array_equal(checked(*args), f(*args))
    assert np.isfinite(f(*args))
    # vmapped inside, also with diagonal structure
    g = jax.jit(
        jax.vmap(lambda w: kalman.smoother(*diagonal_model(w, np.full(2, 0.3))).log_likelihood)
    )
    ws = jnp.asarray(rng.normal(size=(4, 6, 2)))
    np.testing.assert_array_equal(kalman.checked(g)(ws), g(ws))


def test_checked_catches_a_zero_variance_under_jit(loglik):
    """Unchecked, a zero prior variance under jit runs and gives a finite number."""
    f, checked = loglik
    rng = np.random.default_rng(4)
    w, mask = jnp.asarray(rng.normal(size=(6, 3))), jnp.ones(6)
    P0_singular = jnp.asarray(np.diag([0.6, 0.0]))
    assert np.isfinite(f(w, jnp.asarray(R), mask, P0_singular))
    with pytest.raises(ValueError, match="prior covariance P0 must be positive definite"):
        checked(w, jnp.asarray(R), mask, P0_singular)
    with pytest.raises(ValueError, match="R must be positive definite"):
        checked(w, jnp.asarray(R).at[2, 2].set(0.0), mask, jnp.asarray(P0))
    with pytest.raises(ValueError, match="R must be symmetric"):
        checked(w, jnp.asarray(R).at[0, 1].set(0.2), mask, jnp.asarray(P0))
    g = jax.jit(jax.vmap(lambda w, R: kalman.filter(*diagonal_model(w, R)).log_likelihood))
    R_zero = jnp.full((3, 2), 0.3).at[1, 0].set(0.0)
    with pytest.raises(ValueError, match="R must be positive"):
        kalman.checked(g)(jnp.asarray(rng.normal(size=(3, 6, 2))), R_zero)


def test_checked_catches_nan_in_observed_data_and_a_non_binary_mask_under_jit(loglik):
    f, checked = loglik
    w = jnp.asarray(np.random.default_rng(5).normal(size=(6, 3))).at[3, 1].set(jnp.nan)
    R_, P0_ = jnp.asarray(R), jnp.asarray(P0)
    with pytest.raises(ValueError, match=r"w \(where observed\) contains NaN"):
        checked(w, R_, jnp.ones(6), P0_)
    np.testing.assert_array_equal(  # the same NaN, masked: fine
        checked(w, R_, jnp.ones(6).at[3].set(0.0), P0_), f(w, R_, jnp.ones(6).at[3].set(0.0), P0_)
    )
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        checked(w.at[3, 1].set(0.0), R_, jnp.full(6, 0.5), P0_)
    with pytest.raises(TypeError, match="under a trace"):
        jax.jit(checked)(w, R_, jnp.ones(6), P0_)


def test_checked_runs_the_models_input_checks_under_jit():
    model = lgssm(A, Q, H, R, m0=M0, P0=P0)
    guide = kalman_smoothing(model)
    loss = jax.jit(
        lambda obs, mask: Trace_ELBO().loss(jax.random.key(0), {}, model, guide, obs, mask=mask)
    )
    obs = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 3)))
    mask = jnp.ones((2, 4))
    np.testing.assert_array_equal(kalman.checked(loss)(obs, mask), loss(obs, mask))
    with pytest.raises(ValueError, match="obs contains NaN/inf"):
        kalman.checked(loss)(obs.at[1, 2, 0].set(jnp.inf), mask)
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        kalman.checked(loss)(obs, mask.at[0, 1].set(0.5))


def test_one_step_rssm_elbo_with_the_amortised_filtering_guide():
    """At T = 1 the filtering guide draws z_0 alone, like the model (no site "z" on either side):
    both ELBOs are finite (they raised ZeroDivisionError / AssertionError on an empty "z")."""
    from inference import guides

    model = rssm(DIMS, 1, stoch=2, deter=3, hidden=4)
    guide = guides.filtering(model)
    rng = np.random.default_rng(1)
    obs = {k: rng.normal(size=(2, 1, p)) for k, p in DIMS.items()}
    actions = rng.normal(size=(2, 1, 1))
    key = jax.random.key(0)
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        loss = elbo.loss(key, {}, model, guide, obs, actions)
        assert np.isfinite(loss)
    tr = handlers.trace(handlers.seed(guide, key)).get_trace(obs, actions)
    assert "z" not in tr and tr["z_0"]["value"].shape == (2, 2)


def test_the_single_kalman_step_refuses_a_mask_that_is_not_0_1():
    belief = kalman.Gaussian(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="mask must be boolean or 0/1"):
        kalman.update(belief, jnp.ones(2), jnp.ones(2), mask=jnp.array(0.5))
    post, _ = kalman.update(belief, jnp.ones(2), jnp.ones(2), mask=jnp.array(1.0))
    np.testing.assert_allclose(post.mean, 0.5)  # (0 + 1 * 1) / (1 + 1)


def test_the_single_kalman_step_reads_every_mask_shape():
    """Per step (B,), per sensor (B, K) and per entry (B, K, d) masks of a batched diagonal
    update, against the update with the masked sensors left out by hand."""
    rng = np.random.default_rng(3)
    B, K, d = 3, 2, 4
    belief = kalman.Gaussian(jnp.asarray(rng.normal(size=(B, d))), jnp.ones((B, d)))
    w, R = jnp.asarray(rng.normal(size=(B, K, d))), jnp.asarray(rng.uniform(0.5, 2, (B, K, d)))
    per_step = jnp.array([1.0, 0.0, 1.0])
    post, _ = kalman.update(belief, w, R, per_step)
    full, _ = kalman.update(belief, w, R)
    np.testing.assert_allclose(post.mean[1], belief.mean[1])
    np.testing.assert_allclose(post.mean[::2], full.mean[::2])
    per_sensor = jnp.array([[1.0, 0.0]] * B)
    post, ll = kalman.update(belief, w, R, per_sensor)
    first, ll1 = kalman.update(belief, w[:, 0], R[:, 0])
    np.testing.assert_allclose(post.mean, first.mean)
    np.testing.assert_allclose(ll, ll1)
    per_entry = jnp.broadcast_to(per_sensor[..., None], (B, K, d))
    np.testing.assert_allclose(kalman.update(belief, w, R, per_entry)[0].mean, first.mean)


def test_zero_width_actions_are_no_actions_for_a_model_without_actions():
    """``inference.evaluation`` passes ``(B, T, 0)`` actions to an action-free world model:
    KalMamba's whole-sequence filter takes them as none (it raised, and
    ``examples.pendulum_sysid --models kalmamba`` failed after training); real actions are
    still refused."""
    from inference.evaluation import filter_beliefs
    from pssm.inputs import prepare_inputs
    from rl.world_model import from_parts
    from rl.world_models.kalmamba import kalmamba_parts

    obs = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    assert prepare_inputs(3, 0, obs, np.zeros((2, 5, 0), np.float32)).actions is None
    with pytest.raises(ValueError, match="action_dim=0"):
        prepare_inputs(3, 0, obs, np.zeros((2, 5, 1), np.float32))
    made = kalmamba_parts(3, 0, reward=False, latent_dim=4, hidden=(8,), d_model=8, d_state=4)
    wm = from_parts(made)
    batch = {"obs": obs, "mask": np.ones((2, 5), bool)}
    params, _ = wm.objective.init(jax.random.key(0), batch)
    params = wm.objective.constrain(params)
    none = filter_beliefs(wm, params, jax.random.key(1), obs, None)
    empty = filter_beliefs(wm, params, jax.random.key(1), obs, np.zeros((2, 5, 0), np.float32))
    np.testing.assert_array_equal(np.asarray(none.mean), np.asarray(empty.mean))
