"""Gradients against finite differences, float32 on long sequences, and clear errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from inference import kalman


def _model(diagonal, T, d=3, K=2, seed=0, dtype=np.float64, stable=False):
    rng = np.random.default_rng(seed)
    if diagonal:
        A = rng.uniform(0.5, 0.95, d) if stable else rng.uniform(-1.1, 1.1, (T - 1, d))
        P0, Q = np.ones(d), rng.uniform(0.05, 0.3, d)
        R = rng.uniform(0.2, 1.0, (K, d))
        w = rng.normal(size=(T, K, d))
        mask = rng.random((T, K)) > 0.3
        H = None
    else:
        A = (
            0.9 * np.linalg.qr(rng.normal(size=(d, d)))[0]
            if stable
            else rng.normal(size=(T - 1, d, d)) / np.sqrt(d)
        )
        P0, Q = np.eye(d), 0.2 * np.eye(d) + 0.05 * np.ones((d, d))
        p = 2
        H = rng.normal(size=(p, d))
        R = 0.5 * np.eye(p) + 0.1
        w = rng.normal(size=(T, p))
        mask = rng.random(T) > 0.3
    w = np.where(mask[..., None] if mask.ndim < w.ndim else mask, w, np.nan)  # NaN where missing
    b = rng.normal(size=d) * 0.1
    cast = lambda x: None if x is None else np.asarray(x, dtype)
    return (
        kalman.Gaussian(cast(np.zeros(d)), cast(P0)),
        kalman.Dynamics(cast(A), cast(b), cast(Q)),
        kalman.Emissions(cast(w), cast(R), mask, cast(H)),
    )


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_gradients_match_finite_differences(diagonal, parallel):
    prior, dyn, em = _model(diagonal, T=6)
    weights = np.random.default_rng(1).normal(size=(6, 3))

    def objective(m0, log_P0_scale, A, b, log_Q_scale, log_R_scale):
        p = kalman.Gaussian(m0, prior.cov * jnp.exp(log_P0_scale))
        dynamics = kalman.Dynamics(A, b, dyn.Q * jnp.exp(log_Q_scale))
        e = em._replace(R=em.R * jnp.exp(log_R_scale))
        post = kalman.smoother(p, dynamics, e, parallel=parallel)
        return (
            post.log_likelihood
            + jnp.sum(kalman.expected_kl(post, dynamics))
            + jnp.sum(post.smoothed.mean * weights)
            + jnp.sum(post.smoothed.cov)
        )

    args = (prior.mean, 0.1, dyn.A, dyn.b, -0.2, 0.3)
    check_grads(objective, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)
    grads = jax.grad(objective, argnums=tuple(range(6)))(*args)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "dense"])
def test_float32_long_sequence_stays_finite_and_close_to_float64(diagonal, parallel):
    T = 10_000
    m64 = _model(diagonal, T, seed=3, stable=True)
    m32 = _model(diagonal, T, seed=3, stable=True, dtype=np.float32)
    run = jax.jit(partial(kalman.smoother, parallel=parallel))
    p64, p32 = run(*m64), run(*m32)
    assert p32.smoothed.mean.dtype == jnp.float32
    for leaf in jax.tree.leaves(p32):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    ll64, ll32 = float(p64.log_likelihood), float(p32.log_likelihood)
    assert abs(ll32 - ll64) < 0.5, (ll32, ll64)  # ~1e-5 relative over 10k steps
    np.testing.assert_allclose(p32.smoothed.mean, p64.smoothed.mean, atol=2e-3)
    np.testing.assert_allclose(p32.smoothed.cov, p64.smoothed.cov, atol=2e-4)
    if not parallel:  # (the parallel gradient's compile alone takes ~30 s at T=10k on 2 cores)
        loss = lambda A: run(m32[0], m32[1]._replace(A=A), m32[2]).log_likelihood
        assert bool(jnp.all(jnp.isfinite(jax.jit(jax.grad(loss))(m32[1].A))))


def _valid(diagonal=True):
    return _model(diagonal, T=5)


def _bad_cases():
    p, dyn, em = _valid()
    pd, dynd, emd = _valid(False)
    yield "m0", (kalman.Gaussian(p.mean[:, None], p.cov), dyn, em), "m0"
    yield "P0 shape", (kalman.Gaussian(p.mean, p.cov[:2]), dyn, em), "P0"
    yield "A length", (p, dyn._replace(A=np.ones((7, 3))), em), "A has shape"
    yield "b shape", (p, dyn._replace(b=np.ones(4)), em), "b has shape"
    yield "Q shape", (p, dyn._replace(Q=np.ones((2, 3))), em), "Q has shape"
    yield "R shape", (p, dyn, em._replace(R=np.ones((3, 3)))), "R has shape"
    yield "w width", (p, dyn, em._replace(w=em.w[..., :2])), "w has shape"
    yield "mask shape", (p, dyn, em._replace(mask=np.ones((5, 3), bool))), "mask has shape"
    yield "H on diag", (p, dyn, em._replace(H=np.eye(3))), "H must be None"
    yield "P0 <= 0", (kalman.Gaussian(p.mean, -p.cov), dyn, em), "P0 must be positive"
    yield "Q <= 0", (p, dyn._replace(Q=dyn.Q * 0), em), "Q must be positive"
    yield "R <= 0", (p, dyn, em._replace(R=-em.R)), "R must be positive"
    yield "NaN in A", (p, dyn._replace(A=dyn.A * np.nan), em), "A contains NaN"
    yield "NaN in m0", (kalman.Gaussian(p.mean * np.nan, p.cov), dyn, em), "m0 contains NaN"
    w = np.nan_to_num(em.w)
    w[0, 0, 0] = np.nan
    yield "NaN in observed w", (p, dyn, em._replace(w=w, mask=None)), "w \\(where observed\\)"
    yield "dense R not PD", (pd, dynd, emd._replace(R=-emd.R)), "R must be positive definite"
    yield (
        "dense Q asym",
        (pd, dynd._replace(Q=dynd.Q + np.triu(np.ones((3, 3)), 1)), emd),
        "Q must be symmetric",
    )
    yield "dense H shape", (pd, dynd, emd._replace(H=np.ones((2, 4)))), "H has shape"
    yield "dense w ndim", (pd, dynd, emd._replace(w=emd.w[:, :, None])), "w has shape"
    yield (
        "no steps",
        (p, dyn._replace(A=dyn.A[0]), em._replace(w=em.w[:0], mask=None)),
        "at least one time step",
    )


@pytest.mark.parametrize("name,args,match", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_a_clear_value_error(name, args, match):
    with pytest.raises(ValueError, match=match):
        kalman.smoother(*args)


def test_shape_errors_are_raised_at_trace_time_under_jit():
    p, dyn, em = _valid()
    with pytest.raises(ValueError, match="A has shape"):
        jax.jit(kalman.filter)(p, dyn._replace(A=np.ones((7, 3))), em)


def test_missing_entries_may_hold_nan_and_do_not_leak_into_gradients():
    p, dyn, em = _valid()
    assert np.isnan(em.w).any()
    g = jax.grad(lambda A: kalman.smoother(p, dyn._replace(A=A), em).log_likelihood)(dyn.A)
    assert bool(jnp.all(jnp.isfinite(g)))
