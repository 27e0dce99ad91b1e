"""The square-root form (``kalman.sqrt``): brute-force conditioning, the covariance form in float64,
masks and multi-sensor stacking, sampling, gradients, and the float32 ill-conditioned model on
which the covariance form breaks down and the square-root form does not."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from scipy.stats import multivariate_normal

from inference import kalman
from inference.kalman import sqrt as ks
from tests.kalman_models import random_case, specs
from tests.kalman_reference import reference

_smoother = {p: jax.jit(partial(ks.smoother, parallel=p)) for p in (False, True)}
_cov_smoother = {p: jax.jit(partial(kalman.smoother, parallel=p)) for p in (False, True)}
_smoothed_dynamics = jax.jit(ks.smoothed_dynamics)


def _to_sqrt(*model):
    return tuple(ks.to_sqrt(x) for x in model)


def _is_lower_cholesky(L):
    L = np.asarray(L)
    assert np.all(np.triu(L, 1) == 0)
    assert np.all(np.diagonal(L, axis1=-2, axis2=-1) >= 0)


def _close_tree(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(jnp.abs(y).max())) if y.size else 1.0
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale)


# (seed, d, T, K, time_varying, ill): static and time-varying parameters, one and several
# sensors with masks and a fully missing step, ill-conditioned noise, T = 1 and T = 2
_CASES = [(0, 3, 12, 2, True, False), (1, 2, 9, 3, False, True), (2, 4, 1, 2, True, False)]
_CASES += [(3, 1, 2, 1, False, False)]


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("spec", _CASES, ids=[f"d{c[1]}-T{c[2]}-K{c[3]}" for c in _CASES])
def test_sqrt_matches_brute_force_conditioning(spec, parallel):
    seed, d, T, K, time_varying, ill = spec
    case = random_case(seed, d, T, K, False, time_varying, ill)
    ref = reference(case.dense)
    tol = 1e-5 if ill else 1e-8
    scale = max(1.0, float(np.abs(ref.posterior_cov).max()), float(np.abs(ref.smoothed_mean).max()))
    ll_scale = max(1.0, float(np.abs(ref.log_likelihoods).max()))

    def close(actual, expected, s=scale):
        np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol * s)

    root = _smoother[parallel](*_to_sqrt(*case[:3]))
    for belief in (root.filtered.predicted, root.filtered.filtered, root.smoothed):
        _is_lower_cholesky(belief.chol)
    _is_lower_cholesky(root.backward.chol)
    post = ks.from_sqrt(root)
    f = post.filtered
    close(f.predicted.mean, ref.predicted_mean)
    close(f.predicted.cov, ref.predicted_cov)
    close(f.filtered.mean, ref.filtered_mean)
    close(f.filtered.cov, ref.filtered_cov)
    close(post.smoothed.mean, ref.smoothed_mean)
    close(post.smoothed.cov, ref.smoothed_cov)
    close(post.cross_cov, ref.cross_cov)
    close(f.log_likelihoods, ref.log_likelihoods, ll_scale)
    close(post.log_likelihood, ref.log_likelihoods.sum(), ll_scale * T)
    # backward conditionals q(z_t | z_{t+1}, o_{0:t}), also recomputed from the filtered
    # beliefs alone, and smoothed dynamics q(z_{t+1} | z_t, o_{0:T-1}): gain, offset, covariance
    again = ks.backward_conditionals(root.filtered, ks.to_sqrt(case.dynamics))
    _close_tree(again, root.backward, 1e-10)
    for got, want in zip(post.backward, ref.backward, strict=True):
        close(got, want)
    forward = _smoothed_dynamics(root)
    _is_lower_cholesky(forward.chol)
    for got, want in zip(ks.from_sqrt(forward), ref.forward, strict=True):
        close(got, want)


@settings(max_examples=max(4, settings.default.max_examples // 5))
@given(spec=specs(diagonal=False, max_d=4, max_T=12), per_entry=st.booleans())
def test_sqrt_equals_covariance_form_in_float64(spec, per_entry):
    """The same results as ``kalman.smoother`` (through ``from_sqrt``), also with a per-entry
    mask over the stacked sensors' rows (``random_case`` masks whole sensors)."""
    case = spec.build()
    e = case.emissions
    if per_entry:
        rows = np.broadcast_to(np.asarray(e.mask).reshape(spec.T, -1), e.w.shape)
        e = e._replace(mask=rows & (np.random.default_rng(spec.seed).random(e.w.shape) > 0.3))
    cov = _cov_smoother[False](case.prior, case.dynamics, e)
    root = _smoother[False](*_to_sqrt(case.prior, case.dynamics, e))
    _close_tree(ks.from_sqrt(root), cov, 1e-6 if spec.ill else 1e-9)


def _any_root(rng, cov):
    """A square root of ``cov`` that is not triangular: ``U diag(sqrt(lambda))``."""
    lam, U = np.linalg.eigh(cov)
    return U * np.sqrt(lam)[..., None, :] @ np.linalg.qr(rng.normal(size=cov.shape))[0]


def test_stacked_sensors_with_any_square_roots_equal_the_covariance_form():
    """Sensors stacked by ``kalman.sqrt.stack_sensors``, their noise given by non-triangular
    square roots (static and time-varying), masked per sensor and step, equal the covariance
    form on ``kalman.stack_sensors`` of the same sensors."""
    rng = np.random.default_rng(0)
    T, d = 7, 3
    case = random_case(5, d, T, 1, False, True, False)
    sensors, roots = [], []
    for k, p in enumerate((1, 2, 3)):
        H = rng.normal(size=(p, d))
        S = rng.normal(size=(T, p, p) if k == 1 else (p, p)) + 2 * np.eye(p)
        R = S @ np.swapaxes(S, -1, -2)
        w = rng.normal(size=(T, p))
        mask = rng.random(T) > 0.3
        sensors.append(kalman.Emissions(np.where(mask[:, None], w, np.nan), R, mask, H))
        roots.append(ks.SqrtEmissions(sensors[-1].w, _any_root(rng, R), mask, H))
    cov = _cov_smoother[False](case.prior, case.dynamics, kalman.stack_sensors(sensors))
    prior = ks.SqrtGaussian(case.prior.mean, _any_root(rng, case.prior.cov))
    dyn = ks.SqrtDynamics(case.dynamics.A, case.dynamics.b, _any_root(rng, case.dynamics.Q))
    for parallel in (False, True):
        root = _smoother[parallel](prior, dyn, ks.stack_sensors(roots))
        _close_tree(ks.from_sqrt(root), cov, 1e-9)


def test_single_step_predict_and_update_equal_the_covariance_form():
    rng = np.random.default_rng(1)
    d, p = 3, 4
    case = random_case(2, d, 2, 1, False, False, False)
    belief = kalman.Gaussian(case.prior.mean, case.prior.cov)
    dyn = kalman.Dynamics(case.dynamics.A, case.dynamics.b, case.dynamics.Q)
    H = rng.normal(size=(p, d))
    S = rng.normal(size=(p, p)) + 2 * np.eye(p)
    w = rng.normal(size=p)
    _close_tree(
        ks.from_sqrt(ks.predict(ks.to_sqrt(belief), ks.to_sqrt(dyn))),
        kalman.predict(belief, dyn),
        1e-12,
    )
    for mask in (None, np.array([1, 0, 1, 1]), np.zeros(p), 1.0):
        want = kalman.update(belief, w, S @ S.T, mask, H)
        post, ll = ks.update(ks.to_sqrt(belief), w, S, mask, H)
        _close_tree((ks.from_sqrt(post), ll), want, 1e-12)


def _mc_check(samples, expected, k=5.0):
    """|mean(samples) - expected| <= k * standard error, per entry."""
    samples = np.asarray(samples)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    err = np.abs(samples.mean(axis=0) - expected)
    assert np.all(err <= k * se + 1e-12), (err.max(), (err / (se + 1e-300)).max())


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_ffbs_draws_from_the_posterior_with_exact_log_density(parallel):
    case = random_case(7, 2, 7, 2, False, True, False)
    ref = reference(case.dense)
    model = _to_sqrt(*case[:3])
    key = jax.random.PRNGKey(1)
    z, logp = jax.jit(partial(ks.ffbs, num_samples=4000, parallel=parallel))(key, *model)
    flat = np.asarray(z).reshape(len(z), -1)
    _mc_check(flat, ref.posterior_mean)
    centred = flat - ref.posterior_mean
    iu = np.triu_indices(flat.shape[1])
    _mc_check((centred[:, :, None] * centred[:, None, :])[:, iu[0], iu[1]], ref.posterior_cov[iu])
    exact = multivariate_normal(ref.posterior_mean, ref.posterior_cov).logpdf(flat[:50])
    np.testing.assert_allclose(logp[:50], exact, rtol=1e-8, atol=1e-8)
    # the covariance form factorises the backward covariances the square-root form carries
    # as factors: the same draws for the same key; posterior_sample of the smoother's result too
    # (num_samples too: the keys are split from ``key`` by their number)
    cov_ffbs = jax.jit(partial(kalman.ffbs, num_samples=4000, parallel=parallel))
    z_cov, logp_cov = cov_ffbs(key, *case[:3])
    _close_tree((z[:50], logp[:50]), (z_cov[:50], logp_cov[:50]), 1e-9)
    z2, logp2 = ks.posterior_sample(key, _smoother[parallel](*model), num_samples=4000)
    _close_tree((z2[:50], logp2[:50]), (z[:50], logp[:50]), 1e-9)


def test_forward_sampling_through_smoothed_dynamics_and_chain_log_prob():
    case = random_case(11, 2, 6, 1, False, False, False)
    ref = reference(case.dense)
    post = _smoother[False](*_to_sqrt(*case[:3]))
    first = ks.SqrtGaussian(post.smoothed.mean[0], post.smoothed.chol[0])
    fwd = _smoothed_dynamics(post)
    z, logp = ks.sample_chain(jax.random.PRNGKey(2), first, fwd, num_samples=4000)
    flat = np.asarray(z).reshape(len(z), -1)
    _mc_check(flat, ref.posterior_mean)
    exact = multivariate_normal(ref.posterior_mean, ref.posterior_cov).logpdf(flat[:20])
    np.testing.assert_allclose(logp[:20], exact, rtol=1e-8)
    last = ks.SqrtGaussian(post.filtered.filtered.mean[-1], post.filtered.filtered.chol[-1])
    score = jax.vmap(lambda p: ks.chain_log_prob(last, post.backward, p, reverse=True))
    np.testing.assert_allclose(score(z[:20]), exact, rtol=1e-8)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_gradients_match_finite_differences(parallel):
    """Through every QR of both drivers (the parallel filter's derivatives are the sequential
    recursion's, see :mod:`inference.kalman.sqrt.filtering`)."""
    case = random_case(0, 2, 5, 2, False, True, False)
    prior, dyn, em = _to_sqrt(*case[:3])
    weights = np.random.default_rng(1).normal(size=(5, 2))

    def objective(m0, A, b, LQ, log_R_scale):
        e = em._replace(chol=em.chol * jnp.exp(log_R_scale))
        post = ks.smoother(prior._replace(mean=m0), ks.SqrtDynamics(A, b, LQ), e, parallel=parallel)
        fwd = ks.smoothed_dynamics(post)
        return (
            post.log_likelihood
            + jnp.sum(post.smoothed.mean * weights)
            + jnp.sum(post.smoothed.chol)
            + jnp.sum(post.cross_cov)
            + jnp.sum(fwd.A)
            + jnp.sum(fwd.chol)
        )

    args = (prior.mean, dyn.A, dyn.b, dyn.chol, 0.3)
    check_grads(jax.jit(objective), args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def _ill_conditioned(dtype):
    """Noise spanning 1e-6..1e6 (prior, dynamics and sensors): a 1e6 prior variance next to a
    1e-6 one, an exact sensor beside a useless one, rotated by the dynamics; representable in
    float32 (diagonal covariances), so the covariance form accepts it."""
    rng = np.random.default_rng(2)
    d, T = 3, 20
    P0 = np.diag([1e6, 1.0, 1e-6])
    A = 0.99 * np.linalg.qr(rng.normal(size=(d, d)))[0]
    Q = np.diag([1e-6, 1e-3, 1e6])
    H = rng.normal(size=(2, d))
    R = np.diag([1e-6, 1e6])
    w = rng.normal(size=(T, 2))
    model = (
        kalman.Gaussian(np.zeros(d), P0),
        kalman.Dynamics(A, None, Q),
        kalman.Emissions(w, R, None, H),
    )
    cast = lambda tree: jax.tree.map(lambda x: np.asarray(x, dtype), tree)  # noqa: E731
    return [cast(x) for x in model], [cast(ks.to_sqrt(x)) for x in model]  # factors in float64


def _broken(result) -> bool:
    """Non-finite anywhere, or a filtered or smoothed covariance with an eigenvalue below
    -1e-4 times its largest entry (far beyond float32 rounding of a PSD matrix)."""
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(result)):
        return True
    for P in (result.filtered.filtered.cov, result.smoothed.cov):
        P = np.asarray(P, np.float64)
        if np.any(np.linalg.eigvalsh(P).min(-1) < -1e-4 * np.abs(P).max((-1, -2))):
            return True
    return False


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_float32_ill_conditioned_model_sqrt_stays_finite_and_psd_where_covariance_fails(parallel):
    (cov32, root32), (cov64, _) = _ill_conditioned(np.float32), _ill_conditioned(np.float64)
    exact = _cov_smoother[False](*cov64)
    # the covariance form breaks down (P - U^T U loses positive definiteness; the smoother's
    # next Cholesky factorisation returns NaN) ...
    assert _broken(_cov_smoother[parallel](*cov32))
    # ... the square-root form does not: finite lower-triangular factors (PSD by construction),
    # close to the float64 posterior
    root = _smoother[parallel](*root32)
    assert root.smoothed.chol.dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(root))
    for belief in (root.filtered.filtered, root.smoothed):
        _is_lower_cholesky(belief.chol)
    post = ks.from_sqrt(jax.tree.map(lambda x: np.asarray(x, np.float64), root))
    assert not _broken(post)
    assert abs(float(post.log_likelihood) - float(exact.log_likelihood)) < 1e-3
    for got, want in [
        (post.smoothed.mean, exact.smoothed.mean),
        (post.filtered.filtered.mean, exact.filtered.filtered.mean),
        (post.smoothed.cov, exact.smoothed.cov),
        (post.cross_cov, exact.cross_cov),
    ]:
        np.testing.assert_allclose(got, want, atol=1e-3 * float(np.abs(want).max()))
    if parallel:
        return  # (the parallel filter's derivatives are the sequential recursion's)
    prior, dyn, em = root32

    def loglik(A):
        return ks.smoother(prior, dyn._replace(A=A), em, parallel=parallel).log_likelihood

    grad = jax.jit(jax.grad(loglik))
    assert bool(jnp.all(jnp.isfinite(grad(root32[1].A))))


def test_bad_input_raises_clear_errors():
    case = random_case(0, 2, 4, 1, False, False, False)
    prior, dyn, em = _to_sqrt(*case[:3])
    with pytest.raises(TypeError, match="to_sqrt"):
        ks.smoother(case.prior, dyn, em)  # a covariance where a square root is expected
    with pytest.raises(TypeError, match="to_sqrt"):
        ks.filter(prior, case.dynamics, em)
    with pytest.raises(ValueError, match="Q square root must be nonsingular"):
        ks.smoother(prior, dyn._replace(chol=np.zeros((2, 2))), em)
    with pytest.raises(ValueError, match="prior square root has shape"):
        ks.smoother(prior._replace(chol=np.ones(2)), dyn, em)
    with pytest.raises(ValueError, match="w \\(where observed\\)"):
        ks.smoother(prior, dyn, em._replace(w=np.nan_to_num(em.w) * np.nan, mask=None))
    # under jit the same checks are staged for kalman.checked
    loglik = jax.jit(lambda LQ: ks.smoother(prior, dyn._replace(chol=LQ), em).log_likelihood)
    with pytest.raises(ValueError, match="Q square root must be nonsingular"):
        kalman.checked(loglik)(np.zeros((2, 2)))
    assert np.isfinite(kalman.checked(loglik)(dyn.chol))
