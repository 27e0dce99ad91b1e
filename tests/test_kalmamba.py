"""Tests of KalMamba (pssm.kalmamba) and its world model (rl.world_models.kalmamba): sites and
the declared latent LGSSM, causality and masks, sequential == parallel forward passes (structure,
filtered and smoothed moments, ELBO), the Mahalanobis regulariser against a naive filter, the
ELBO wrapper (inference.objectives.KalMambaELBO), MC dropout, likelihoods against hand
computations, training, image modalities, and the belief step (model.belief_step, the world
model's observe / imagine / filter_sequence): stepping it equals its time-parallel filter and the
program's filtered beliefs."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO
from scipy import stats

from inference import kalman, training
from inference.guides import kalman_smoothing
from inference.objectives import KalMambaELBO
from pssm.kalmamba import kalmamba
from pssm.locally_linear import locally_linear
from pssm.vrkn import vrkn
from rl import world_model as W
from rl.world_models.kalmamba import kalmamba_world_model

B, T, D, U = 3, 5, 2, 1
DIMS = {"a": 2, "b": 3}
SIZES = dict(hidden=6, d_model=4, pre_layers=1, num_blocks=1, d_state=3, d_conv=2, dropout=0.2)


def mlp(p, x):
    """Independent reference of nets.MLP with one hidden layer (ELU)."""
    h = jax.nn.elu(x @ p["layer0"]["kernel"] + p["layer0"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def vrkn_dynamics(p, h, a, act):
    """Independent NumPy reference of VRKN's dynamics model (Becker & Neumann 2022, Sec. 3.2,
    Fig. 3b) with parameters ``p`` and activation ``act``, the GRU's hidden state ``h``:

        x = act(W_1 [h, a] + c_1),  r, u = sigma(W_r,u x + U_r,u h + c_r,u),
        g = (1 - u) tanh(W_n x + c_n + r U_n h) + u h,  y = act(W_2 g + c_2),
        (A~, Q~, b) = W_3 y + c_3,  A = 0.1 + 0.89 sigma(A~ + logit(0.8 / 0.89)),
        Q = 1e-3 + 0.099 sigma(Q~ + logit(0.009 / 0.099))   (0.9 and 0.01 at zero input)."""
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    lin = lambda q, v: v @ np.asarray(q["kernel"]) + np.asarray(q.get("bias", 0.0))
    x = act(lin(p["pre"], np.concatenate([h, a], -1)))
    cell = p["gru"]["cell"]
    xr, xu, xn = np.split(lin(cell["dense_i"], x), 3, -1)
    hr, hu, hn = np.split(lin(cell["dense_h"], h), 3, -1)
    r, u = sig(xr + hr), sig(xu + hu)
    g = (1 - u) * np.tanh(xn + r * hn) + u * h
    A_raw, Q_raw, b = np.split(lin(p["out"], act(lin(p["post"], g))), 3, -1)
    bounded = lambda v, lo, hi, v0: lo + (hi - lo) * sig(v + np.log((v0 - lo) / (hi - v0)))
    return bounded(A_raw, 0.1, 0.99, 0.9), b, bounded(Q_raw, 1e-3, 0.1, 1e-2)


def path(tr):
    return jnp.concatenate([tr["z_0"]["value"][:, None], jnp.moveaxis(tr["z"]["value"], 0, 1)], 1)


def naive_filter(prior, dyn, em):
    """Diagonal Kalman filter of one sequence, one sensor at a time (VRKN's per-sensor updates)."""
    m, P = np.asarray(prior.mean), np.asarray(prior.cov)
    means, covs = [], []
    for t in range(em.w.shape[0]):
        if t > 0:
            A, b, Q = (np.asarray(x[t - 1]) for x in dyn)
            m, P = A * m + b, A * A * P + Q
        for k in range(em.w.shape[1]):
            if em.mask[t, k]:
                gain = P / (P + em.R[t, k])
                m, P = m + gain * (em.w[t, k] - m), (1 - gain) * P
        means.append(m)
        covs.append(P)
    return np.array(means), np.array(covs)


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 4)
    obs = {"a": jax.random.normal(k[0], (B, T, 2)), "b": jax.random.normal(k[1], (B, T, 3))}
    mask = np.ones((B, T, 2), bool)
    mask[0, 2, 1] = mask[1, 4, 0] = False
    mask[2, 3] = False  # a fully missing step
    obs["b"] = obs["b"].at[0, 2].set(jnp.nan)  # missing entries may hold NaN
    obs["a"] = obs["a"].at[2, 3].set(jnp.nan)
    actions = jax.random.normal(k[2], (B, T, U))
    rewards = jax.random.normal(k[3], (B, T))
    return dict(obs=obs, actions=actions, mask=mask, rewards=rewards)


def values(tr):
    return {k: v["value"] for k, v in tr.items()}


def params_of(tr):
    return {k: v["value"] for k, v in tr.items() if v["type"] == "param"}


@pytest.fixture(scope="module")
def models():
    """The same network weights (same seed), Mamba run by associative scan / by lax.scan."""
    par = kalmamba(DIMS, D, U, reward=True, parallel=True, **SIZES)
    seq = kalmamba(DIMS, D, U, reward=True, parallel=False, **SIZES)
    return par, seq


def seeded(fn, key):
    """``fn`` under a ``seed`` handler (``key=None``: unseeded, so no dropout site is drawn)."""
    return fn if key is None else handlers.seed(fn, key)


@pytest.fixture(scope="module")
def lively(models, data):
    """The models' initial parameters with a random output layer of the post-Mamba dynamics
    model (VRKN's, which starts at zero: constant ``A = 0.9, b = 0, Q = 0.01``), so that the
    transitions depend on ``m_t``, ``a_t`` and the dropout masks."""
    tr = handlers.trace(handlers.seed(models[0], 0)).get_trace(**data)
    params = params_of(tr)
    dyn = params["kalmamba_dynamics$params"]
    kernel = dyn["out"]["kernel"]
    random = jax.random.normal(jax.random.key(21), kernel.shape, kernel.dtype)
    out = dict(dyn["out"], kernel=random / np.sqrt(kernel.shape[0]))
    return dict(params, **{"kalmamba_dynamics$params": dict(dyn, out=out)})


@pytest.fixture(scope="module")
def forward(models, lively):
    """Jitted ``model.forward`` of the parallel model at the :func:`lively` parameters, seeded
    with ``key`` (MC-dropout masks drawn at the dropout site) or unseeded (``None``: no
    dropout)."""
    model = models[0]
    return jax.jit(
        lambda obs, actions, mask, key: handlers.substitute(seeded(model.forward, key), lively)(
            model.prepare(obs, actions, mask)
        )
    )


@pytest.fixture(scope="module")
def trace(models, data, lively):
    """Site values of one (jitted) run of the model at the :func:`lively` parameters, and
    those perturbed (in NumPy: nothing to compile) for the world-model tests."""
    run = handlers.substitute(handlers.seed(models[0], 0), lively)
    tr = jax.jit(lambda: values(handlers.trace(run).get_trace(**data)))()
    rng = np.random.default_rng(11)
    perturb = lambda x: np.asarray(x) * (1 + 0.1 * rng.standard_normal(np.shape(x)))
    params = {k: tr[k] for k in tr if k.startswith("kalmamba_") and k != "kalmamba_dropout"}
    return tr, jax.tree.map(perturb, params)


@pytest.fixture(scope="module")
def elbo_runs(models, data, lively):
    """The KalMamba objective (MC dropout on, alpha = 0.5) of the parallel model; the inner ELBO
    of the sequential model with the wrapper's first key half and, substituted in its guide, the
    dropout masks of a forward pass seeded with the second half (what the wrapper does); and
    the same inner ELBO with the guide's own masks."""
    key = jax.random.key(3)
    k_elbo, k_drop = jax.random.split(key)
    inner = TraceMeanField_ELBO()

    def guide(model):
        return kalman_smoothing(model, parallel=model.parallel)

    def posterior(model):
        """The forward pass and the guide's smoother with the ELBO's dropout masks (the same
        computations as inside the ELBO, which the compiler shares)."""
        x = model.prepare(data["obs"], data["actions"], data["mask"])
        f = handlers.substitute(handlers.seed(model.forward, k_drop), lively)(x)
        return f, jax.vmap(partial(kalman.smoother, parallel=model.parallel))(*f.structure)

    @jax.jit
    def run_parallel():
        model = models[0]
        elbo = KalMambaELBO(inner, alpha=0.5)
        out = elbo.loss_with_metrics(key, lively, model, guide(model), **data)
        return out["loss"], out["metrics"], posterior(model)

    @jax.jit
    def run_sequential():
        model = models[1]
        tr = handlers.trace(handlers.seed(model.forward, k_drop)).get_trace(
            model.prepare(data["obs"], data["actions"], data["mask"])
        )
        masks = {"kalmamba_dropout": tr["kalmamba_dropout"]["value"]}
        loss = inner.loss(k_elbo, lively, model, handlers.substitute(guide(model), masks), **data)
        own_masks = inner.loss(k_elbo, lively, model, guide(model), **data)
        return loss, posterior(model), own_masks

    return key, run_parallel(), run_sequential()


def test_sites_shapes_and_structure(data, forward, trace):
    tr = trace[0]
    assert tr["z_0"].shape == (B, D) and tr["z"].shape == (T - 1, B, D)
    assert tr["obs_a"].shape == (B, T, 2) and tr["reward"].shape == (B, T - 1)
    assert set(trace[1]) == {
        "kalmamba_encoder_a$params", "kalmamba_encoder_b$params", "kalmamba_backbone$params",
        "kalmamba_dynamics$params", "kalmamba_P0", "kalmamba_decoder_a$params",
        "kalmamba_decoder_b$params", "kalmamba_reward$params",
    }  # fmt: skip
    f = forward(data["obs"], data["actions"], data["mask"], None)
    s = f.structure
    assert s.prior.mean.shape == s.prior.cov.shape == (B, D) and f.m.shape == (B, T, D)
    np.testing.assert_array_equal(s.prior.mean, 0.0)  # zero mean, learned variance (Sec. 2)
    np.testing.assert_array_equal(s.prior.cov, 1.0)
    assert s.dynamics.A.shape == s.dynamics.b.shape == s.dynamics.Q.shape == (B, T - 1, D)
    assert s.emissions.w.shape == s.emissions.R.shape == (B, T, 2, D)
    np.testing.assert_array_equal(s.emissions.mask, data["mask"])
    assert np.all((s.dynamics.A > 0.1) & (s.dynamics.A < 0.99))
    assert np.all((s.dynamics.Q > 1e-3) & (s.dynamics.Q < 0.1)) and np.all(s.emissions.R > 0)
    assert np.all(np.isfinite(f.m))


def test_causal_and_masked_entries_are_ignored(data, forward):
    """An observed entry at step t changes m_s and the transitions s -> s+1 for s >= t only;
    an action a_t changes m_s for s > t and the transitions from t on; masked entries nothing."""
    run = partial(forward, mask=data["mask"], key=None)
    f = run(data["obs"], data["actions"])
    g = run(dict(data["obs"], b=data["obs"]["b"].at[0, 2].set(7.0)), data["actions"])  # masked
    jax.tree.map(np.testing.assert_array_equal, g, f)
    t = 2
    g = run(dict(data["obs"], a=data["obs"]["a"].at[0, t].add(1.0)), data["actions"])
    dm = np.abs(g.m - f.m).max(-1)
    dA = np.abs(g.structure.dynamics.A - f.structure.dynamics.A).max(-1)
    assert np.all(dm[0, :t] == 0) and np.all(dm[0, t:] > 0) and np.all(dm[1:] == 0)
    assert np.all(dA[0, :t] == 0) and np.all(dA[0, t:] > 0)
    g = run(data["obs"], data["actions"].at[1, t].add(1.0))
    dm = np.abs(g.m - f.m).max(-1)
    dA = np.abs(g.structure.dynamics.A - f.structure.dynamics.A).max(-1)
    assert np.all(dm[1, : t + 1] == 0) and np.all(dm[1, t + 1 :] > 0)
    assert np.all(dA[1, :t] == 0) and np.all(dA[1, t:] > 0)


def test_sequential_and_parallel_forward_passes_agree(elbo_runs):
    """Mamba by lax.scan vs associative scan, Kalman filter/smoother sequential vs parallel,
    and the ELBO (with MC dropout, same keys): equal to rounding."""
    _, (loss, metrics, (f_par, post_par)), (loss_seq, (f_seq, post_seq), own) = elbo_runs
    for a, b in zip(jax.tree.leaves(f_par[:2]), jax.tree.leaves(f_seq[:2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in [
        (post_par.filtered.filtered, post_seq.filtered.filtered),
        (post_par.smoothed, post_seq.smoothed),
    ]:
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(a.cov, b.cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(post_par.log_likelihood, post_seq.log_likelihood, rtol=1e-10)
    # the wrapper's guide draws (and its model replays) the masks of the regulariser's pass,
    # seeded with the second half of its key: its ELBO is the inner ELBO of the sequential
    # model given those masks, not the one with the guide's own draws
    np.testing.assert_allclose(metrics["elbo"], -loss_seq, rtol=1e-10)
    assert not np.isclose(loss_seq, own, rtol=1e-6)
    assert np.isfinite(loss) and metrics["mahalanobis"] > 0


def test_regulariser_and_elbo_wrapper(models, data, forward, elbo_runs, trace):
    """The wrapper's R is Eq. 2 of the same dropout pass as its ELBO (naive per-sensor Kalman
    filter) and its loss is -ELBO + alpha R; with ``detach`` (default) only m receives R's
    gradient, not the filtered belief."""
    key, (loss, metrics, _), _ = elbo_runs
    f = forward(data["obs"], data["actions"], data["mask"], jax.random.split(key)[1])
    R = []
    for b in range(B):
        s = jax.tree.map(lambda x, b=b: np.asarray(x[b]), f.structure)
        mean, cov = naive_filter(s.prior, s.dynamics, s.emissions)
        R.append(np.sum((f.m[b] - mean) ** 2 / cov))
    np.testing.assert_allclose(metrics["mahalanobis"], np.sum(R), rtol=1e-9)
    np.testing.assert_allclose(loss, -metrics["elbo"] + 0.5 * np.sum(R), rtol=1e-10)
    model = models[0]
    names = ["kalmamba_P0", "kalmamba_backbone$params"]
    init = {k: trace[0][k] for k in names}

    def r(p):
        with handlers.substitute(data=p):
            return model.regulariser(**data).sum()

    r_jit, grad = jax.jit(r), jax.jit(jax.grad(r))(init)
    np.testing.assert_array_equal(grad["kalmamba_P0"], 0.0)  # P0 enters the filter only ...
    assert r_jit(dict(init, kalmamba_P0=2 * init["kalmamba_P0"])) != r_jit(init)  # ... it matters
    assert max(np.abs(g).max() for g in jax.tree.leaves(grad["kalmamba_backbone$params"])) > 0


def test_mc_dropout_site_only_under_a_seed(data, forward, trace, lively):
    """The dropout masks are the latent site ``"kalmamba_dropout"`` ~ U(0, 1), drawn only under
    a seed handler (unseeded: no dropout), the same for the same seed; ``mc_dropout=False`` or
    rate 0: no site, no dropout."""
    # pre_layers * d_model, then the VRKN dynamics model's 2 * hidden + D
    assert trace[0]["kalmamba_dropout"].shape == (B, T, 1 * 4 + 2 * 6 + D)
    run = partial(forward, data["obs"], data["actions"], data["mask"])
    k1, k2 = jax.random.split(jax.random.key(5))
    off, off2, on1, on1b, on2 = run(None), run(None), run(k1), run(k1), run(k2)
    jax.tree.map(np.testing.assert_array_equal, off, off2)
    jax.tree.map(np.testing.assert_array_equal, on1, on1b)
    for a, b in [(on1, off), (on1, on2)]:
        assert not np.allclose(a.m, b.m)
        assert not np.allclose(a.structure.dynamics.A, b.structure.dynamics.A)
    # the emissions come from the encoders, which have no dropout
    np.testing.assert_array_equal(on1.structure.emissions.w, off.structure.emissions.w)
    for plain in (
        kalmamba(DIMS, D, U, **dict(SIZES, dropout=0.0)),
        kalmamba(DIMS, D, U, mc_dropout=False, **SIZES),
    ):
        assert not plain.mc_dropout
        fwd = jax.jit(lambda key, m=plain: handlers.substitute(
            handlers.seed(m.forward, key), lively)(m.prepare(*run.args)))  # fmt: skip
        jax.tree.map(np.testing.assert_array_equal, fwd(k1), fwd(k2))
        # same weights, no dropout: the unseeded pass (another compilation: to rounding)
        close = partial(np.testing.assert_allclose, rtol=1e-12, atol=1e-14)
        jax.tree.map(close, fwd(k1), off)
        tr = handlers.trace(handlers.seed(plain.forward, 0)).get_trace(plain.prepare(*run.args))
        assert "kalmamba_dropout" not in tr


def test_post_mamba_dynamics_is_the_vrkn_dynamics_model(data, forward, lively):
    """KalMamba's post-Mamba network is VRKN's dynamics model with SiLU (KalMamba paper, Table
    2), fed ``m_t`` and ``a_t``: the forward pass's ``A_t, b_t, Q_t`` equal the NumPy reference
    of VRKN's equations with KalMamba's parameters, ``A_t`` and ``Q_t`` inside VRKN's sigmoid
    bounds; VRKN's own transition network (ReLU) equals the same reference with its parameters
    (one network serves both models)."""
    f = forward(data["obs"], data["actions"], data["mask"], None)  # unseeded: no dropout
    p = jax.tree.map(np.asarray, lively["kalmamba_dynamics$params"])
    silu = lambda v: v / (1.0 + np.exp(-v))
    m, a = np.asarray(f.m[:, :-1]), np.asarray(data["actions"][:, :-1])
    expected = vrkn_dynamics(p, m, a, silu)
    for got, want in zip(f.structure.dynamics, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    A, _, Q = expected
    assert np.all((A > 0.1) & (A < 0.99)) and np.all((Q > 1e-3) & (Q < 0.1))
    assert np.ptp(A) > 0.01 and np.ptp(Q) > 1e-3  # the transitions vary with m_t and a_t

    model = vrkn(2, U, latent_dim=D, hidden=5, mlp_hidden=(4,), mc_dropout=False)
    params = params_of(handlers.trace(handlers.seed(model.networks, 0)).get_trace())
    trans = params["vrkn_transition$params"]
    out = trans["out"]  # zero at initialisation: a random output layer
    kernel = np.random.default_rng(3).standard_normal(np.shape(out["kernel"]))
    params["vrkn_transition$params"] = dict(trans, out=dict(out, kernel=kernel))
    with handlers.substitute(data=params):
        transition = model.networks().transition
    rng = np.random.default_rng(4)
    mean, action = rng.standard_normal((6, D)), rng.standard_normal((6, U))
    expected = vrkn_dynamics(jax.tree.map(np.asarray, params["vrkn_transition$params"]), mean,
                             action, lambda v: np.maximum(v, 0.0))  # fmt: skip
    for got, want in zip(transition(mean, action), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_likelihoods_against_hand_computation(models, data):
    """Conditioned z: the masked decoder likelihoods and the reward term
    ``rewards[:, :-1] ~ N(rew(z_{1:T}), 1)`` equal a hand computation."""
    z = jax.random.normal(jax.random.key(6), (B, T, D))
    cond = {"z_0": z[:, 0], "z": jnp.moveaxis(z[:, 1:], 1, 0)}

    @jax.jit
    def run():
        tr = handlers.trace(handlers.seed(handlers.condition(models[0], cond), 0)).get_trace(**data)
        sites = ["obs_a", "obs_b", "reward"]
        return params_of(tr), {k: tr[k]["fn"].log_prob(tr[k]["value"]) for k in sites}

    params, log_probs = run()
    for k, name in enumerate(DIMS):
        mean = mlp(params[f"kalmamba_decoder_{name}$params"], z)
        dense = stats.norm.logpdf(np.nan_to_num(np.asarray(data["obs"][name])), mean, 1.0)
        expected = np.where(data["mask"][..., k], dense.sum(-1), 0.0).sum(-1)
        np.testing.assert_allclose(log_probs[f"obs_{name}"], expected, rtol=1e-10)
    r_mean = mlp(params["kalmamba_reward$params"], z[:, 1:])[..., 0]
    expected = stats.norm.logpdf(np.asarray(data["rewards"][:, :-1]), r_mean, 1.0).sum(-1)
    np.testing.assert_allclose(log_probs["reward"], expected, rtol=1e-10)


def _image_model_trace():
    """An image (conv encoder / decoder of pssm.layers) fused with a vector sensor: the model's
    image site, its log-density, the latent path and the structure."""
    dims = {"img": (48, 48, 1), "v": 2}
    model = kalmamba(dims, D, U, **dict(SIZES, conv_depth=2))
    k = jax.random.split(jax.random.key(10), 2)
    obs = {  # uint8 pixels, preprocessed by the model
        "img": jax.random.randint(k[0], (2, 3, 48, 48, 1), 0, 256).astype(jnp.uint8),
        "v": jax.random.normal(k[1], (2, 3, 2)),
    }
    mask = np.ones((2, 3, 2), bool)
    mask[0, 1, 0] = False
    tr = handlers.trace(handlers.seed(model, 0)).get_trace(obs, jnp.zeros((2, 3, U)), mask)
    site = tr["obs_img"]
    s = model.structure(obs, jnp.zeros((2, 3, U)), mask)
    pixels = model.preprocess(obs)["img"]
    return site["value"], site["fn"].log_prob(site["value"]), tr["z"]["value"], s, pixels


def test_image_modality_shapes():
    """Built and traced abstractly (``jax.eval_shape``: no compilation)."""
    img, log_prob, z, s, _ = jax.eval_shape(_image_model_trace)
    assert img.shape == (2, 3, 48, 48, 1) and log_prob.shape == (2,) and z.shape == (2, 2, D)
    assert s.emissions.w.shape == (2, 3, 2, D) and s.dynamics.A.shape == (2, 2, D)


@pytest.mark.slow
def test_image_modality_values():
    img, log_prob, z, s, pixels = jax.jit(_image_model_trace)()
    # the image site scores the preprocessed pixels (zeros where masked: sequence 0, step 1)
    expected = np.asarray(pixels).copy()
    expected[0, 1] = 0.0
    np.testing.assert_array_equal(img, expected)
    assert pixels.min() >= -0.5 and pixels.max() <= 0.5 - 1 / 32  # 5-bit colour depth
    assert np.all(np.isfinite(log_prob)) and np.all(np.isfinite(z))
    assert np.all(np.isfinite(s.emissions.w)) and np.all(s.emissions.R > 0)
    np.testing.assert_array_equal(s.emissions.mask[0, 1], [False, True])


def test_bad_inputs(models, data):
    model = models[0]
    with pytest.raises(ValueError, match="rewards"):
        model(**dict(data, rewards=data["rewards"][:, :-1]))
    with pytest.raises(ValueError, match="reward head"):
        kalmamba(DIMS, D, U, **SIZES)(**data)
    with pytest.raises(ValueError, match="H, W, C"):
        kalmamba({"x": (4, 4)}, D, U, **SIZES)
    with pytest.raises(ValueError):
        model(dict(data["obs"], a=data["obs"]["a"][..., :1]), data["actions"])
    other = locally_linear(DIMS, D, U, hidden=4)
    with pytest.raises(TypeError, match="KalMamba"):
        KalMambaELBO().loss_with_metrics(
            jax.random.key(0), {}, other, kalman_smoothing(other), data["obs"], data["actions"]
        )
    with pytest.raises(ValueError, match="actions"):
        kalmamba_world_model(DIMS, 0, latent_dim=D, **SIZES)


# --- the world model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wm():
    """KalMamba as a world model: the weights of ``models[0]`` (same sizes and seed)."""
    return kalmamba_world_model(DIMS, U, latent_dim=D, **SIZES)


def test_world_model_stepwise_filter_equals_parallel(wm, models, data, trace):
    """The belief step's wiring (float64, dropout off): scanning ``condition`` / ``predict``
    (the world model's observe / imagine, generic scan) == its time-parallel ``filter``
    (``filter_sequence``) on every leaf of the belief, Mamba states included; the filtered
    moments are a naive filter's of the program's declared latent LGSSM."""
    params = trace[1]
    key = jax.random.key(12)
    args = (data["obs"], data["actions"], data["mask"])
    generic = wm._replace(filter_sequence=None)

    @jax.jit
    def run(p):
        with handlers.substitute(data=p):
            s = models[0].structure(*args)
        return W.filter_sequence(wm, p, key, *args), W.filter_sequence(generic, p, key, *args), s

    par, seq, s = run(params)
    assert par.mean.shape == (B, T, D) and par.action.shape == (B, T, U)
    assert par.mamba[0].ssm.shape[:2] == (B, T)
    for a, b in zip(jax.tree.leaves(par), jax.tree.leaves(seq), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for b in range(B):
        mean, cov = naive_filter(*jax.tree.map(lambda x, b=b: np.asarray(x[b]), s))
        np.testing.assert_allclose(par.mean[b], mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(par.cov[b], cov, rtol=1e-9)
    # sequence 2 misses step 3 entirely: its filtered Gaussian is the prediction from step 2
    A, b_, Q = (np.asarray(x[2, 2]) for x in s.dynamics)
    np.testing.assert_allclose(par.mean[2, 3], A * par.mean[2, 2] + b_, rtol=1e-10)
    np.testing.assert_allclose(par.cov[2, 3], A * A * par.cov[2, 2] + Q, rtol=1e-10)


def test_world_model_acting_functions(wm, data, trace):
    """features / reward / decode, MC dropout in acting only when asked, and an imagined
    rollout whose predicted rewards are differentiable in the parameters."""
    params = trace[1]
    wm_drop = kalmamba_world_model(DIMS, U, latent_dim=D, act_dropout=True, **SIZES)
    obs0 = {k: v[:, 0] for k, v in data["obs"].items()}
    a = data["actions"][:, 0]

    @jax.jit
    def run(p, key):
        b = wm.observe(p, key, wm.init_belief(p, B), obs0, data["mask"][:, 0])
        f = wm.features(p, b)
        imagined = [w.imagine(p, key, b, a).mean for w in (wm, wm_drop)]
        return b, f, wm.reward(p, f), wm.decode(p, f), imagined

    b, f, r, dec, (im1, im1_drop) = run(params, jax.random.key(1))
    *_, (im2, im2_drop) = run(params, jax.random.key(2))
    assert f.shape == (B, wm.feature_size) and r.shape == (B,)
    assert dec["a"].shape == (B, 2) and dec["b"].shape == (B, 3)
    np.testing.assert_array_equal(im1, im2)
    assert not np.allclose(im1_drop, im2_drop)

    @jax.jit
    def rollout_grad(p, b):
        def total_reward(p, b):
            policy = lambda feat, key: jnp.tanh(feat[:, :U])
            key = jax.random.key(3)
            _, _, rewards = W.imagine_rollout(wm, p, key, b, policy=policy, horizon=2)
            return rewards.sum()

        return jax.grad(total_reward, argnums=(0, 1))(p, b)

    grads = rollout_grad(params, b)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(np.abs(grads[0]["kalmamba_dynamics$params"]["out"]["kernel"]) > 0)
    assert np.any(np.abs(grads[1].mean) > 0) and np.any(np.abs(grads[1].m) > 0)


def test_world_model_trains(wm):
    """Noisy sinusoids with actions, rewards and missing data: the world model's objective
    (parallel smoothing guide, MC dropout, Mahalanobis term, reward head) falls, stays finite."""
    n = 8
    t = jnp.arange(T)
    phase = jax.random.uniform(jax.random.key(7), (n, 1, 1), maxval=6.0)
    clean = jnp.sin(0.7 * t[None, :, None] + phase)
    noise = 0.05 * jax.random.normal(jax.random.key(8), (n, T, 3))
    obs = {"a": clean[..., :1] * jnp.ones(2), "b": clean * jnp.arange(1.0, 4.0) + noise}
    mask = np.ones((n, T, 2), bool)
    mask[::3, 2, 0] = False
    batch = {
        "obs": obs, "actions": 0.1 * jnp.ones((n, T, U)), "mask": mask,
        "rewards": clean[..., 0],
    }  # fmt: skip
    opt, steps = optax.adam(1e-2), 30
    init = jax.jit(lambda key: training.init_train_state(wm.objective, opt, key, batch))
    _, history = training.fit(
        wm.objective, batch, opt, num_steps=steps, batch_size=n, steps_per_call=steps,
        state=init(jax.random.key(9)), progress=False,
    )  # fmt: skip
    losses, elbos = (np.array([r[k] for r in history]) for k in ("loss", "elbo"))
    assert np.all(np.isfinite(losses)) and {"elbo", "mahalanobis"} <= set(history[0])
    assert losses[-5:].mean() < losses[:5].mean() - 0.2 * abs(losses[:5].mean())
    assert elbos[-5:].mean() > elbos[:5].mean() + 0.1 * abs(elbos[:5].mean())
    # the reported terms add up: loss = -ELBO + alpha R (alpha = 1)
    np.testing.assert_allclose(losses, [-r["elbo"] + r["mahalanobis"] for r in history], rtol=1e-10)


def test_partially_observed_latent(data):
    """``observed_dim=1`` of ``D=2`` (RKN's ``H = [I_1, 0]``): the Kalman core on the structure
    (the unobserved coordinate a missing entry) and the world model's stepwise filter (``r =
    inf``) agree; the unobserved coordinate is a pure prediction; the bound is finite."""
    wm = kalmamba_world_model(DIMS, U, latent_dim=D, observed_dim=1, **SIZES)
    model = kalmamba(DIMS, D, U, reward=True, observed_dim=1, **SIZES)  # the same sites
    assert model.observed_dim == 1
    args = (data["obs"], data["actions"], data["mask"])
    generic = wm._replace(filter_sequence=None)
    key = jax.random.key(4)
    params = params_of(handlers.trace(handlers.seed(model, 0)).get_trace(**data))
    guide = kalman_smoothing(model, parallel=model.parallel)

    @jax.jit
    def run(p):
        with handlers.substitute(data=p):
            s = model.structure(*args)
        loss = TraceMeanField_ELBO().loss(key, p, model, guide, **data)
        # imagination feeds the predicted mean to the backbone as an observation would be
        # fed: the unobserved coordinate is not part of it
        b = wm.observe(p, key, wm.init_belief(p, B), {k: v[:, 0] for k, v in data["obs"].items()})
        moved = b._replace(mean=b.mean.at[:, 1].add(1.0))
        imagined = [wm.imagine(p, key, x, data["actions"][:, 0]) for x in (b, moved)]
        return W.filter_sequence(generic, p, key, *args), s, loss, imagined

    steps, s, loss, (im, im_moved) = run(params)
    filt = jax.vmap(kalman.filter)(*s).filtered
    assert s.emissions.mask.shape == (B, T, 2, D) and not np.any(s.emissions.mask[..., 1])
    np.testing.assert_allclose(steps.mean, filt.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(steps.cov, filt.cov, rtol=1e-9)
    A, b, Q = (np.asarray(x[..., 1]) for x in s.dynamics)
    np.testing.assert_allclose(filt.mean[:, 1:, 1], A * filt.mean[:, :-1, 1] + b, rtol=1e-10)
    np.testing.assert_allclose(filt.cov[:, 1:, 1], A * A * filt.cov[:, :-1, 1] + Q, rtol=1e-10)
    assert np.isfinite(loss)  # gradients through r = inf: tests/test_vrkn.py
    np.testing.assert_array_equal(im.m, im_moved.m)
    assert not np.allclose(im.mean[:, 1], im_moved.mean[:, 1])
    with pytest.raises(ValueError, match="observed_dim"):
        kalmamba(DIMS, D, U, observed_dim=3, **SIZES)
