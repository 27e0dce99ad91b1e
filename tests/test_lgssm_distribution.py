"""``LinearGaussianStateSpace``: ``log_prob`` equals the log-density of the stacked observations
as one dense multivariate normal (built with numpy/scipy, no Kalman recursion), samples have
the closed-form moments, gradients match finite differences, and the distribution works as an
observed site of a NumPyro model under ``jit`` and ``plate``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.linalg
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

from pssm.distributions import LinearGaussianStateSpace
from tests.kalman_reference import DenseModel, condition


class Case(NamedTuple):
    kwargs: dict  # constructor arguments of the distribution
    w: np.ndarray  # (T, p), NaN where masked
    observed: np.ndarray  # (T, p) bool


def _spd(rng, n, lead=()):
    U = np.linalg.qr(rng.normal(size=(*lead, n, n)))[0]
    lam = rng.uniform(0.2, 2.0, (*lead, n))
    return np.einsum("...ij,...j,...kj->...ik", U, lam, U)


def make_case(
    seed: int, d: int, p: int, T: int, diagonal: bool, time_varying: bool, mask: str
) -> Case:
    """A random model (diagonal structure forces ``p = d``) and observations for it."""
    rng = np.random.default_rng(seed)
    lead = (T - 1,) if time_varying else ()
    obs_lead = (T,) if time_varying else ()
    kwargs = dict(
        initial_mean=rng.normal(size=d), num_steps=T, transition_offset=rng.normal(size=(*lead, d))
    )
    if diagonal:
        p = d
        kwargs.update(
            initial_cov=rng.uniform(0.2, 2.0, d),
            transition_matrix=rng.uniform(-1.2, 1.2, (*lead, d)),
            transition_cov=rng.uniform(0.2, 2.0, (*lead, d)),
            emission_cov=rng.uniform(0.2, 2.0, (*obs_lead, d)),
        )
    else:
        kwargs.update(
            initial_cov=_spd(rng, d),
            transition_matrix=rng.normal(size=(*lead, d, d)) / np.sqrt(d),
            transition_cov=_spd(rng, d, lead),
            emission_cov=_spd(rng, p, obs_lead),
            emission_matrix=rng.normal(size=(*obs_lead, p, d)),
        )
    if mask == "none":
        observed = np.ones((T, p), bool)
    elif mask == "step":
        kwargs["mask"] = rng.random(T) > 0.35
        observed = np.broadcast_to(kwargs["mask"][:, None], (T, p))
    else:
        kwargs["mask"] = observed = rng.random((T, p)) > 0.35
    w = np.where(observed, 2.0 * rng.normal(size=(T, p)), np.nan)
    return Case(kwargs, w, observed)


def latent_joint(m0, P0, A, b, Q):
    """Mean ``(T d,)`` and covariance of the stacked latent path: ``z = M [z_0, q_0, ...,
    q_{T-2}] + c`` with independent blocks ``z_0 - m_0 ~ N(0, P_0)``, ``q_t ~ N(0, Q_t)``."""
    d, T = m0.shape[0], A.shape[0] + 1
    M = np.zeros((T * d, T * d))
    c = np.zeros(T * d)
    M[:d, :d], c[:d] = np.eye(d), m0
    for t in range(1, T):
        now, before = slice(t * d, (t + 1) * d), slice((t - 1) * d, t * d)
        M[now] = A[t - 1] @ M[before]
        M[now, now] += np.eye(d)
        c[now] = A[t - 1] @ c[before] + b[t - 1]
    return c, M @ scipy.linalg.block_diag(P0, *Q) @ M.T


def dense_form(kwargs: dict):
    """The constructor arguments as per-step dense matrices ``m0, P0, A, b, Q, H, R``."""
    k = {
        name: None if x is None else np.asarray(x, float)
        for name, x in kwargs.items()
        if name not in ("num_steps", "mask")
    }
    T, d = kwargs["num_steps"], k["initial_mean"].shape[0]
    diag = lambda x: x[..., :, None] * np.eye(x.shape[-1])  # noqa: E731
    if k["initial_cov"].ndim == 1:
        P0, A, Q, R = (
            diag(k[n])
            for n in ("initial_cov", "transition_matrix", "transition_cov", "emission_cov")
        )
        H = np.eye(d)
    else:
        P0, A, Q, R = (
            k["initial_cov"],
            k["transition_matrix"],
            k["transition_cov"],
            k["emission_cov"],
        )
        H = np.eye(d) if k.get("emission_matrix") is None else k["emission_matrix"]
    b = np.zeros(d) if k.get("transition_offset") is None else k["transition_offset"]
    p = R.shape[-1]
    return (
        k["initial_mean"],
        P0,
        np.broadcast_to(A, (T - 1, d, d)),
        np.broadcast_to(b, (T - 1, d)),
        np.broadcast_to(Q, (T - 1, d, d)),
        np.broadcast_to(H, (T, p, d)),
        np.broadcast_to(R, (T, p, p)),
    )


def stacked_moments(kwargs: dict):
    """Mean ``(T p,)`` and covariance ``(T p, T p)`` of the stacked observations: the latent
    path's joint Gaussian (:func:`latent_joint`) pushed through ``H``, plus ``R``."""
    m0, P0, A, b, Q, H, R = dense_form(kwargs)
    mu_z, S_z = latent_joint(m0, P0, A, b, Q)
    G = scipy.linalg.block_diag(*H)
    cov = G @ S_z @ G.T + scipy.linalg.block_diag(*R)
    return G @ mu_z, 0.5 * (cov + cov.T)


def reference_log_prob(kwargs: dict, w: np.ndarray, observed: np.ndarray) -> float:
    """``log N(w_obs; mean_obs, cov_obs)`` over the observed entries of the stacked sequence."""
    mean, cov = stacked_moments(kwargs)
    o = observed.reshape(-1)
    if not o.any():
        return 0.0
    return float(
        scipy.stats.multivariate_normal(mean[o], cov[np.ix_(o, o)]).logpdf(w.reshape(-1)[o])
    )


def reference_model(case: Case) -> DenseModel:
    """The case in ``kalman_reference`` form: per step only the observed rows."""
    m0, P0, A, b, Q, H, R = dense_form(case.kwargs)
    o = case.observed
    rows = [(case.w[t][o[t]], H[t][o[t]], R[t][np.ix_(o[t], o[t])]) for t in range(len(H))]
    return DenseModel(m0, P0, A, b, Q, rows)


# (diagonal, time_varying, mask, d, p, T): both structures, static and time-varying parameters,
# every mask form; shapes fixed per kind so each kind compiles once.
KINDS = [
    (True, False, "none", 2, 2, 5),
    (True, True, "entry", 3, 3, 5),
    (False, True, "step", 2, 3, 5),
    (False, False, "entry", 3, 2, 5),
]


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS))
def test_log_prob_equals_dense_multivariate_normal(seed, kind):
    diagonal, time_varying, mask, d, p, T = kind
    case = make_case(seed, d, p, T, diagonal, time_varying, mask)
    lgssm = LinearGaussianStateSpace(**case.kwargs)
    assert lgssm.event_shape == case.w.shape and lgssm.batch_shape == ()
    # two sequences under the same model (leading sample dimensions are mapped over); masked
    # entries of each are NaN
    other = make_case(seed + 1, d, p, T, diagonal, time_varying, "none").w
    other = np.where(case.observed, other, np.nan)
    got = lgssm.log_prob(np.stack([case.w, other])[:, None])
    assert got.shape == (2, 1)
    want = [reference_log_prob(case.kwargs, x, case.observed) for x in (case.w, other)]
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-9, atol=1e-9)


def test_single_step_and_fully_masked_sequences():
    case = make_case(3, 2, 2, 1, diagonal=False, time_varying=False, mask="none")
    lgssm = LinearGaussianStateSpace(**case.kwargs)
    want = reference_log_prob(case.kwargs, case.w, case.observed)
    np.testing.assert_allclose(lgssm.log_prob(case.w), want, rtol=1e-10)
    case = make_case(4, 2, 2, 3, diagonal=True, time_varying=False, mask="none")
    kwargs = dict(case.kwargs, mask=np.zeros(3, bool))
    assert float(LinearGaussianStateSpace(**kwargs).log_prob(np.full((3, 2), np.nan))) == 0.0


@pytest.mark.parametrize("diagonal", [True, False])
def test_posterior_is_brute_force_conditioning(diagonal):
    T, d = 6, 2
    case = make_case(7, d, 3, T, diagonal, time_varying=True, mask="entry")
    lgssm = LinearGaussianStateSpace(**case.kwargs)
    post = lgssm.posterior(case.w)
    mean, cov, ll = condition(reference_model(case), range(T))
    np.testing.assert_allclose(post.smoothed.mean.reshape(-1), mean, rtol=1e-9, atol=1e-9)
    covs = np.asarray(post.smoothed.cov)
    covs = covs[..., None] * np.eye(d) if diagonal else covs
    want = np.stack([cov[d * t : d * (t + 1), d * t : d * (t + 1)] for t in range(T)])
    np.testing.assert_allclose(covs, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(post.log_likelihood, ll, rtol=1e-9)
    np.testing.assert_allclose(lgssm.log_prob(case.w), ll, rtol=1e-9)
    z, lp = lgssm.posterior_sample(jax.random.PRNGKey(0), case.w, num_samples=3)
    assert z.shape == (3, T, d) and lp.shape == (3,) and np.all(np.isfinite(z))


def _within_sampling_error(x, mu, S, k=5.0):
    """Empirical mean and covariance (about ``mu``) of the rows of ``x`` within ``k`` standard
    errors of ``mu`` and ``S``, entry by entry."""
    n = x.shape[0]
    assert np.all(np.abs(x.mean(0) - mu) <= k * np.sqrt(np.diag(S) / n))
    c = x - mu
    prods = c[:, :, None] * c[:, None, :]  # each covariance entry is a mean of n iid products
    assert np.all(np.abs(prods.mean(0) - S) <= k * prods.std(0) / np.sqrt(n))


@pytest.mark.parametrize("diagonal", [True, False])
def test_samples_have_the_closed_form_moments(diagonal):
    T, d, n = 4, 2, 20_000
    p = 2 if diagonal else 3
    case = make_case(11, d, p, T, diagonal, time_varying=not diagonal, mask="step")
    lgssm = LinearGaussianStateSpace(**case.kwargs)
    mean, cov = stacked_moments(case.kwargs)
    np.testing.assert_allclose(lgssm.mean.reshape(-1), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lgssm.variance.reshape(-1), np.diag(cov), rtol=1e-10)

    w, (z,) = lgssm.sample_with_intermediates(jax.random.PRNGKey(1), (n // 100, 100))
    assert w.shape == (n // 100, 100, T, p) and z.shape == (n // 100, 100, T, d)
    assert np.all(np.isfinite(w))  # complete draws whatever the mask
    _within_sampling_error(np.asarray(w).reshape(n, -1), mean, cov)
    m0, P0, A, b, Q, _, _ = dense_form(case.kwargs)
    mu_z, S_z = latent_joint(m0, P0, A, b, Q)
    _within_sampling_error(np.asarray(z).reshape(n, -1), mu_z, S_z)
    np.testing.assert_array_equal(lgssm.sample(jax.random.PRNGKey(1), (n // 100, 100)), w)


@pytest.mark.parametrize("diagonal", [True, False])
def test_log_prob_gradients_match_finite_differences(diagonal):
    case = make_case(5, 2, 2, 3, diagonal, time_varying=False, mask="entry")
    k = case.kwargs
    names = ["initial_mean", "transition_matrix", "transition_offset"]
    names += [] if diagonal else ["emission_matrix"]
    free = {name: k[name] for name in names}
    log_scale = {"transition_cov": 0.0, "emission_cov": 0.0}  # keeps covariances valid
    w_obs = np.where(case.observed, case.w, 0.0)

    def f(free, log_scale, w):
        kw = dict(k, **free)
        kw.update({name: k[name] * jnp.exp(s) for name, s in log_scale.items()})
        w = jnp.where(case.observed, w, jnp.nan)  # masked entries stay NaN
        return LinearGaussianStateSpace(**kw).log_prob(w)

    args = (free, log_scale, w_obs)
    grads = jax.grad(f, argnums=(0, 1, 2))(*args)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    np.testing.assert_array_equal(np.asarray(grads[2])[~case.observed], 0.0)
    rng = np.random.default_rng(0)
    h = 1e-5

    def at(s, v):
        return jax.tree.map(lambda x, u: x + s * h * u, args, v)

    for _ in range(3):
        v = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), args)
        fd = (f(*at(1.0, v)) - f(*at(-1.0, v))) / (2 * h)
        ad = sum(np.sum(np.asarray(g) * u) for g, u in zip(leaves, jax.tree.leaves(v), strict=True))
        np.testing.assert_allclose(ad, fd, rtol=1e-6, atol=1e-7)


def test_observed_site_in_a_numpyro_model_under_jit():
    case = make_case(9, 2, 3, 5, diagonal=False, time_varying=False, mask="step")

    def kwargs(a, r):
        return dict(case.kwargs, transition_matrix=a * jnp.eye(2), emission_cov=r * jnp.eye(3))

    def model(w):
        a = numpyro.sample("a", dist.Uniform(-1.0, 1.0))
        r = numpyro.sample("r", dist.LogNormal(0.0, 1.0))
        numpyro.sample("w", LinearGaussianStateSpace(**kwargs(a, r)), obs=w)

    @jax.jit
    def joint(a, r, w):
        return log_density(model, (w,), {}, {"a": a, "r": r})[0]

    for a, r in ((0.3, 0.7), (-0.8, 2.0)):
        kw = kwargs(np.float64(a), np.float64(r))
        want = reference_log_prob(kw, case.w, case.observed)
        prior = scipy.stats.uniform(-1, 2).logpdf(a) + scipy.stats.lognorm(1.0).logpdf(r)
        np.testing.assert_allclose(joint(a, r, case.w), want + prior, rtol=1e-9)
    g = jax.jit(jax.grad(joint, argnums=(0, 1)))(0.3, 0.7, case.w)
    assert np.all(np.isfinite(g))


def test_plate_of_independent_sequences():
    case = make_case(2, 2, 2, 4, diagonal=True, time_varying=False, mask="none")
    seqs = np.asarray(LinearGaussianStateSpace(**case.kwargs).sample(jax.random.PRNGKey(0), (3,)))

    def model(w=None):
        with numpyro.plate("sequences", 3):
            return numpyro.sample("w", LinearGaussianStateSpace(**case.kwargs), obs=w)

    got = jax.jit(lambda w: log_density(model, (w,), {}, {})[0])(seqs)
    want = sum(reference_log_prob(case.kwargs, s, case.observed) for s in seqs)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    prior = Predictive(model, num_samples=2)(jax.random.PRNGKey(1))
    assert prior["w"].shape == (2, 3, 4, 2)


def test_invalid_arguments_raise_value_errors():
    k = make_case(1, 2, 2, 4, diagonal=False, time_varying=False, mask="none").kwargs
    kd = make_case(1, 2, 2, 4, diagonal=True, time_varying=False, mask="none").kwargs
    with pytest.raises(ValueError, match="num_steps"):
        LinearGaussianStateSpace(**dict(k, num_steps=0))
    with pytest.raises(ValueError, match="batch_shape"):
        LinearGaussianStateSpace(**dict(k, initial_mean=np.zeros((3, 2))))
    with pytest.raises(ValueError, match="emission_matrix"):
        LinearGaussianStateSpace(**dict(kd, emission_matrix=np.eye(2)))
    for validate in (True, False):  # shape checks happen either way
        with pytest.raises(ValueError, match="A has shape"):
            LinearGaussianStateSpace(**dict(k, transition_matrix=np.eye(3)), validate_args=validate)
    with pytest.raises(ValueError, match="R has shape"):  # also under jit
        jax.jit(lambda R: LinearGaussianStateSpace(**dict(k, emission_cov=R)).mean)(np.eye(3))
    with pytest.raises(ValueError, match="mask"):
        LinearGaussianStateSpace(**dict(k, mask=np.ones(5, bool)))
    with pytest.raises(ValueError, match="Q must be positive definite"):
        LinearGaussianStateSpace(**dict(k, transition_cov=-np.eye(2)), validate_args=True)
    with pytest.raises(ValueError, match="value has shape"):
        LinearGaussianStateSpace(**k).log_prob(np.zeros((3, 2)))
