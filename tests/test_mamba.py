"""Tests of pssm.mamba: the Mamba stack against a per-step NumPy loop of the paper's equations
(both scan drivers), ZOH against the matrix exponential, causality, chunked and stepwise
processing with carried state, initialisation and bad inputs."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pssm.mamba import Mamba, SelectiveSSM, selective_scan, zoh

B, T, DM, N, K = 2, 7, 4, 3, 3  # batch, time, d_model, d_state, d_conv


@partial(nnx.jit, static_argnames=("parallel", "return_states"))
def run(model, u, state=None, parallel=True, return_states=False):
    """``model(u, state)``, compiled once per shape (eager scans retrace on every call)."""
    return model(u, state, parallel=parallel, return_states=return_states)


scan = jax.jit(selective_scan, static_argnames=("parallel", "return_states"))


def np_(v):
    return np.asarray(v[...], np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def naive_mixer(mix: SelectiveSSM, u: np.ndarray) -> np.ndarray:
    """The Mamba mixer on one sequence ``(T, d_model)``, one step at a time, from zero state."""
    E, R = mix.d_inner, mix.dt_rank
    xg = u @ np_(mix.in_proj.kernel)
    x, g = xg[:, :E], xg[:, E:]
    kernel, bias = np_(mix.conv_kernel), np_(mix.conv_bias)
    W_x, W_dt, c_dt = np_(mix.x_proj.kernel), np_(mix.dt_proj.kernel), np_(mix.dt_proj.bias)
    A = -np.exp(np_(mix.A_log))
    buf = np.zeros((mix.d_conv - 1, E))
    h = np.zeros((E, mix.d_state))
    out = []
    for t in range(u.shape[0]):
        window = np.vstack([buf, x[t]])  # the last K conv inputs, oldest first
        buf = window[1:]
        xc = silu((kernel * window).sum(0) + bias)
        proj = xc @ W_x
        dt, Bt, Ct = proj[:R], proj[R : R + mix.d_state], proj[R + mix.d_state :]
        delta = softplus(dt @ W_dt + c_dt)
        Abar = np.exp(delta[:, None] * A)
        Bbar = (Abar - 1.0) / A * Bt[None, :]  # ZOH: (delta A)^-1 (exp(delta A) - 1) delta B
        h = Abar * h + Bbar * xc[:, None]
        y = (h @ Ct + np_(mix.D) * xc) * silu(g[t])
        out.append(y @ np_(mix.out_proj.kernel))
    return np.array(out)


def rmsnorm(norm, u):
    return u / np.sqrt(np.mean(u * u, -1, keepdims=True) + norm.epsilon) * np_(norm.scale)


def naive_stack(model: Mamba, u: np.ndarray) -> np.ndarray:
    for block in model.blocks():
        u = u + naive_mixer(block.mixer, rmsnorm(block.norm, u))
    return rmsnorm(model.norm, u)


@pytest.fixture(scope="module")
def model():
    return Mamba(DM, num_blocks=2, d_state=N, d_conv=K, expand=2, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def u():
    return jax.random.normal(jax.random.key(1), (B, T, DM))


@pytest.mark.parametrize("parallel", [True, False], ids=["associative_scan", "scan"])
def test_stack_equals_naive_loop(model, u, parallel):
    y, _ = run(model, u, parallel=parallel)
    assert y.dtype == jnp.float64
    expected = np.stack([naive_stack(model, np.asarray(u[b])) for b in range(B)])
    np.testing.assert_allclose(y, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("parallel", [True, False], ids=["associative_scan", "scan"])
def test_causal(model, u, parallel):
    t = 4
    y, _ = run(model, u, parallel=parallel)
    y2, _ = run(model, u.at[:, t].add(1.0), parallel=parallel)
    np.testing.assert_array_equal(y2[:, :t], y[:, :t])
    assert np.all(np.abs(y2[:, t] - y[:, t]).max(-1) > 1e-3)


def test_state_carries_chunks_and_single_steps(model, u):
    """T single steps (length-1 sequences) with the state handed on equal the full sequence; the
    per-step states of ``return_states`` end in the final state; both drivers agree."""
    y, final = run(model, u)
    y_seq, final_seq = run(model, u, parallel=False)
    np.testing.assert_allclose(y_seq, y, rtol=1e-12, atol=1e-13)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-13), final_seq, final)
    state, steps = model.init_state((B,)), []
    for t in range(T):
        y_t, state = run(model, u[:, t : t + 1], state, parallel=False)
        steps.append(y_t[:, 0])
    np.testing.assert_allclose(jnp.stack(steps, 1), y, rtol=1e-12, atol=1e-13)
    _, states = run(model, u, return_states=True)
    for s_all, s_last in zip(jax.tree.leaves(states), jax.tree.leaves(final), strict=True):
        assert s_all.shape == (B, T, *s_last.shape[1:])
        np.testing.assert_allclose(s_all[:, -1], s_last, atol=1e-13)
    # the conv buffer after step t holds the last K - 1 conv inputs x_{t-K+2..t}
    mix = model.block0.mixer
    x = (model.block0.norm(u) @ mix.in_proj.kernel[...])[..., : mix.d_inner]
    np.testing.assert_allclose(states[0].conv[:, 4], x[:, 3:5], atol=1e-13)


def test_zoh_equals_matrix_exponential():
    """``Bbar = int_0^delta exp(A s) ds B`` from the exponential of ``[[A, B], [0, 0]] delta``."""
    E, n = 3, 4
    k = jax.random.split(jax.random.key(2), 3)
    delta = jax.random.uniform(k[0], (E,), minval=0.01, maxval=2.0)
    A = -jax.random.uniform(k[1], (E, n), minval=0.1, maxval=5.0)
    Bv = jax.random.normal(k[2], (n,))
    Abar, Bbar = zoh(delta, A, Bv)
    for e in range(E):
        for j in range(n):
            M = np.array([[A[e, j], Bv[j]], [0.0, 0.0]]) * float(delta[e])
            F = scipy.linalg.expm(M)
            np.testing.assert_allclose([Abar[e, j], Bbar[e, j]], F[0], rtol=1e-12)


@settings(max_examples=10)
@given(st.booleans(), st.integers(0, 2**16))
def test_selective_scan_is_the_linear_recurrence(parallel, seed):
    T_, E, n = 6, 2, 3
    k = jax.random.split(jax.random.key(seed), 6)
    delta = jax.random.uniform(k[0], (T_, E), minval=0.01, maxval=1.0)
    A = -jax.random.uniform(k[1], (E, n), minval=0.5, maxval=3.0)
    Bm, C = jax.random.normal(k[2], (T_, n)), jax.random.normal(k[3], (T_, n))
    x, h0 = jax.random.normal(k[4], (T_, E)), jax.random.normal(k[5], (E, n))
    y, hs = scan(delta, A, Bm, C, x, h0, parallel=parallel, return_states=True)
    h, A_np = np.asarray(h0), np.asarray(A)
    for t in range(T_):
        a = np.exp(np.asarray(delta[t])[:, None] * A_np)
        h = a * h + (a - 1.0) / A_np * np.asarray(Bm[t])[None] * np.asarray(x[t])[:, None]
        np.testing.assert_allclose(hs[t], h, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(y[t], h @ np.asarray(C[t]), rtol=1e-11, atol=1e-12)


def test_initialisation(model):
    mix = model.block0.mixer
    assert mix.d_inner == 2 * DM and mix.dt_rank == 1  # ceil(d_model / 16)
    assert mix.in_proj.kernel.shape == (DM, 4 * DM) and mix.x_proj.kernel.shape == (
        2 * DM,
        1 + 2 * N,
    )
    np.testing.assert_allclose(
        -np.exp(np_(mix.A_log)), -np.tile(np.arange(1.0, N + 1), (2 * DM, 1))
    )
    dt = softplus(np_(mix.dt_proj.bias))  # log-uniform in [dt_min, dt_max] = [1e-3, 0.1]
    assert np.all((dt >= 1e-3 * (1 - 1e-9)) & (dt <= 0.1 * (1 + 1e-9)))
    assert np.all(np.abs(np_(mix.dt_proj.kernel)) <= 1.0)  # U(-dt_rank^-1/2, dt_rank^-1/2)
    np.testing.assert_array_equal(np_(mix.D), 1.0)
    state = mix.init_state((3,))
    assert state.conv.shape == (3, K - 1, 2 * DM) and state.ssm.shape == (3, 2 * DM, N)
    assert nnx.eval_shape(lambda: SelectiveSSM(32, d_state=2, rngs=nnx.Rngs(0))).dt_rank == 2


def test_bad_inputs():
    with pytest.raises(ValueError):
        SelectiveSSM(4, d_state=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        Mamba(4, num_blocks=0, rngs=nnx.Rngs(0))
    m = Mamba(DM, num_blocks=1, d_state=N, d_conv=K, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected"):
        m(jnp.zeros((2, 3, DM + 1)))
    with pytest.raises(ValueError, match="blocks"):
        m(jnp.zeros((2, 3, DM)), m.init_state((2,)) * 2)
