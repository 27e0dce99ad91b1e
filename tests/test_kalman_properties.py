"""Properties of the Kalman core beyond the brute-force comparison: structure equivalence,
smoothed dynamics, Monte Carlo checks of the expected KL and of FFBS, sensor order, vmap."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal

from inference import kalman
from tests.kalman_models import random_case, specs
from tests.kalman_reference import reference

_smoother = {p: jax.jit(partial(kalman.smoother, parallel=p)) for p in (False, True)}
_smoothed_dynamics = jax.jit(kalman.smoothed_dynamics)
#: these properties sit beside the brute-force comparison (test_kalman_reference.py), which
#: draws the profile's full number of models; half as many here (each new shape compiles)
_half = settings(max_examples=max(10, settings.default.max_examples // 2))


def _as_dense(case):
    """The same diagonal model written with dense matrices and stacked sensor rows."""
    (m0, P0), (A, b, Q) = case.prior, case.dynamics
    w, R, mask = (np.asarray(x) for x in case.emissions[:3])
    if w.ndim == 2:  # (T, d) single-sensor form
        w, R, mask = w[:, None], R[..., None, :], mask[:, None]
    T, K, d = w.shape
    R = np.broadcast_to(R, w.shape)
    mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (3 - mask.ndim)), w.shape)
    diag = lambda x: np.asarray(x)[..., :, None] * np.eye(np.shape(x)[-1])
    return (
        kalman.Gaussian(m0, np.diag(P0)),
        kalman.Dynamics(
            diag(A),
            b,
            diag(Q),
        ),
        kalman.Emissions(
            w.reshape(T, K * d),
            diag(R.reshape(T, K * d)),
            mask.reshape(T, K * d),
            np.tile(np.eye(d), (K, 1)),
        ),
    )


@_half
@given(spec=specs(diagonal=True))
def test_diagonal_equals_dense_on_diagonal_models(spec):
    case = spec.build()
    diag = _smoother[False](case.prior, case.dynamics, case.emissions)
    dense = _smoother[False](*_as_dense(case))
    tol = 1e-6 if spec.ill else 1e-9
    for got, want in [
        (diag.smoothed.mean, dense.smoothed.mean),
        (diag.filtered.filtered.mean, dense.filtered.filtered.mean),
        (diag.smoothed.cov, jnp.diagonal(dense.smoothed.cov, axis1=-2, axis2=-1)),
        (diag.cross_cov, jnp.diagonal(dense.cross_cov, axis1=-2, axis2=-1)),
        (diag.filtered.log_likelihoods, dense.filtered.log_likelihoods),
    ]:
        scale = max(1.0, float(jnp.abs(want).max())) if want.size else 1.0
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@_half
@given(spec=specs(max_T=25))
def test_smoothed_dynamics_reproduce_the_smoothed_marginals(spec):
    """Integrating q(z_{t+1} | z_t) against q(z_t) gives q(z_{t+1}) and Cov(z_t, z_{t+1})."""
    case = spec.build()
    post = _smoother[False](case.prior, case.dynamics, case.emissions)
    M, c, S = _smoothed_dynamics(post)
    ms, Ps = post.smoothed
    tol = 1e-5 if spec.ill else 1e-9
    scale = max(1.0, float(jnp.abs(Ps).max()), float(jnp.abs(ms).max()))
    if case.diagonal:
        cov_next = M * M * Ps[:-1] + S
        cross = M * Ps[:-1]
    else:
        cov_next = M @ Ps[:-1] @ jnp.swapaxes(M, -1, -2) + S
        cross = jnp.swapaxes(M @ Ps[:-1], -1, -2)
    mean_next = jnp.einsum("tij,tj->ti", M, ms[:-1]) if not case.diagonal else M * ms[:-1]
    np.testing.assert_allclose(mean_next + c, ms[1:], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(cov_next, Ps[1:], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(cross, post.cross_cov, rtol=tol, atol=tol * scale)


def _mc_check(samples, expected, k=5.0):
    """|mean(samples) - expected| <= k * standard error, per entry."""
    samples = np.asarray(samples)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    err = np.abs(samples.mean(axis=0) - expected)
    assert np.all(err <= k * se + 1e-12), (err.max(), (err / (se + 1e-300)).max())


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_expected_kl_matches_monte_carlo(diagonal):
    case = random_case(3, 3, 12, 2, diagonal, True, False)
    post = _smoother[False](case.prior, case.dynamics, case.emissions)
    kl = np.asarray(kalman.expected_kl(post, case.dynamics))
    fwd = kalman.smoothed_dynamics(post)
    A, b, Q = (np.asarray(x) for x in case.dynamics)
    ms, Ps = (np.asarray(x) for x in post.smoothed)
    rng = np.random.default_rng(0)
    n = 20000
    for t in range(len(kl)):
        if diagonal:
            zt = ms[t] + np.sqrt(Ps[t]) * rng.normal(size=(n, 3))
            qm = fwd.A[t] * zt + fwd.b[t]
            z1 = qm + np.sqrt(fwd.Q[t]) * rng.normal(size=(n, 3))
            logq = multivariate_normal(np.zeros(3), np.diag(fwd.Q[t])).logpdf(z1 - qm)
            logp = multivariate_normal(np.zeros(3), np.diag(Q[t])).logpdf(z1 - A[t] * zt - b[t])
        else:
            zt = rng.multivariate_normal(ms[t], Ps[t], size=n)
            qm = zt @ np.asarray(fwd.A[t]).T + fwd.b[t]
            S = np.asarray(fwd.Q[t])
            z1 = qm + rng.multivariate_normal(np.zeros(3), S, size=n)
            logq = multivariate_normal(np.zeros(3), S).logpdf(z1 - qm)
            logp = multivariate_normal(np.zeros(3), Q[t]).logpdf(z1 - zt @ A[t].T - b[t])
        _mc_check((logq - logp)[:, None], np.array([kl[t]]))
        assert kl[t] >= 0


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_ffbs_samples_have_posterior_moments_and_exact_log_density(diagonal, parallel):
    case = random_case(7, 2, 9, 2, diagonal, True, False)
    ref = reference(case.dense)
    z, logp = jax.jit(partial(kalman.ffbs, num_samples=20000, parallel=parallel))(
        jax.random.PRNGKey(1), case.prior, case.dynamics, case.emissions
    )
    z = np.asarray(z)
    T, d = z.shape[1:]
    flat = z.reshape(len(z), T * d)
    _mc_check(flat, ref.posterior_mean)
    centred = flat - ref.posterior_mean
    iu = np.triu_indices(T * d)
    second = (centred[:, :, None] * centred[:, None, :])[:, iu[0], iu[1]]
    _mc_check(second, ref.posterior_cov[iu])
    exact = multivariate_normal(ref.posterior_mean, ref.posterior_cov).logpdf(flat[:50])
    np.testing.assert_allclose(logp[:50], exact, rtol=1e-8, atol=1e-8)
    # the smoother's own backward conditionals give the same draws for the same key
    post = _smoother[parallel](case.prior, case.dynamics, case.emissions)
    z2, logp2 = kalman.posterior_sample(
        jax.random.PRNGKey(1), post, num_samples=20000, parallel=parallel
    )
    np.testing.assert_allclose(z2[:50], z[:50], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(logp2[:50], logp[:50], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_chain_log_prob_and_forward_sampling_agree(diagonal):
    """Forward sampling through the smoothed dynamics draws from the same posterior, and
    ``chain_log_prob`` scores any path with the posterior density."""
    case = random_case(11, 2, 6, 1, diagonal, False, False)
    ref = reference(case.dense)
    post = _smoother[False](case.prior, case.dynamics, case.emissions)
    first = kalman.Gaussian(post.smoothed.mean[0], post.smoothed.cov[0])
    fwd = kalman.smoothed_dynamics(post)
    z, logp = kalman.sample_chain(jax.random.PRNGKey(2), first, fwd, num_samples=20000)
    flat = np.asarray(z).reshape(20000, -1)
    _mc_check(flat, ref.posterior_mean)
    exact = multivariate_normal(ref.posterior_mean, ref.posterior_cov).logpdf(flat[:20])
    np.testing.assert_allclose(logp[:20], exact, rtol=1e-8)
    last = kalman.Gaussian(post.filtered.filtered.mean[-1], post.filtered.filtered.cov[-1])
    back = jax.vmap(lambda p: kalman.chain_log_prob(last, post.backward, p, reverse=True))(z[:20])
    np.testing.assert_allclose(back, exact, rtol=1e-8)


@_half
@given(spec=specs(max_T=12, max_K=3), data=st.data())
def test_result_does_not_depend_on_sensor_order(spec, data):
    case = spec.build()
    if spec.K == 1:
        return
    perm = np.array(data.draw(st.permutations(range(spec.K))))
    e = case.emissions
    if case.diagonal:
        if np.ndim(e.w) == 2:
            return
        R = e.R[..., perm, :]
        mask = e.mask[:, perm] if e.mask.ndim >= 2 else e.mask
        permuted = kalman.Emissions(e.w[:, perm], R, mask)
    else:
        # stacked rows: permute whole sensor blocks, here rows within the stack suffice
        rows = np.random.default_rng(spec.seed).permutation(e.w.shape[1])
        permuted = kalman.Emissions(
            e.w[:, rows], e.R[:, rows][:, :, rows], e.mask[:, rows], e.H[:, rows]
        )
    a = _smoother[False](case.prior, case.dynamics, case.emissions)
    b = _smoother[False](case.prior, case.dynamics, permuted)
    tol = 1e-6 if spec.ill else 1e-10
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(1.0, float(jnp.abs(y).max())) if y.size else 1.0
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale)


def test_vmap_over_a_batch_equals_a_loop():
    cases = [random_case(s, 3, 10, 2, True, True, False) for s in range(4)]
    masks = [
        np.broadcast_to(
            c.emissions.mask.reshape(c.emissions.mask.shape + (1,) * (3 - c.emissions.mask.ndim)),
            (10, 2, 3),
        )
        for c in cases
    ]
    stack = lambda xs: jnp.stack([jnp.asarray(x) for x in xs])
    prior = kalman.Gaussian(*(stack(x) for x in zip(*[c.prior for c in cases], strict=True)))
    dyn = kalman.Dynamics(*(stack(x) for x in zip(*[c.dynamics for c in cases], strict=True)))
    em = kalman.Emissions(
        stack([c.emissions.w for c in cases]), stack([c.emissions.R for c in cases]), stack(masks)
    )
    batched = jax.vmap(kalman.smoother)(prior, dyn, em)
    for i, c in enumerate(cases):
        one = kalman.smoother(c.prior, c.dynamics, c.emissions)
        np.testing.assert_allclose(batched.smoothed.mean[i], one.smoothed.mean, rtol=1e-12)
        np.testing.assert_allclose(batched.log_likelihood[i], one.log_likelihood, rtol=1e-12)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_static_parameters_equal_their_broadcast_time_varying_form(diagonal, masked):
    """Static parameters and an absent mask take their own (un-broadcast) path through both
    drivers; it must give what the same model written out per step gives."""
    rng = np.random.default_rng(7)
    d, T = 3, 9
    case = random_case(11, d, T, 1, diagonal, False, False)
    (m0, P0), (A, b, Q) = case.prior, case.dynamics
    w, R = np.asarray(case.emissions.w), np.asarray(case.emissions.R)
    w = w.reshape(T, -1)
    R = R.reshape(R.shape[-1:] if diagonal else R.shape[-2:])
    mask = (rng.uniform(size=w.shape) > 0.3).astype(float) if masked else None
    H = None if diagonal else rng.normal(size=(w.shape[1], d))
    static = (kalman.Gaussian(m0, P0), kalman.Dynamics(A, b, Q), kalman.Emissions(w, R, mask, H))
    per_step = lambda x, n: np.broadcast_to(x, (n, *np.shape(x)))  # noqa: E731
    varying = (
        static[0],
        kalman.Dynamics(per_step(A, T - 1), per_step(b, T - 1), per_step(Q, T - 1)),
        kalman.Emissions(
            w,
            per_step(R, T),
            np.ones(w.shape) if mask is None else mask,
            None if H is None else per_step(H, T),
        ),
    )
    for parallel in (False, True):
        got, want = (_smoother[parallel](*model) for model in (static, varying))
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10)
