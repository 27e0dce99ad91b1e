"""Tests of the RSSM and the amortised filtering guide: sites and shapes, the deterministic path,
prior and decoder against hand-written GRU/MLP equations, masked multi-modal likelihoods,
filtering (no dependence on future observations), parameters shared with the model, training,
jit / particles / Predictive, the ELBO against the exact LGSSM log-likelihood and the
closed-form filtering guide, and clear errors for bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from scipy import stats

from inference import training
from inference.guides import closed_form_filtering, filtering
from pssm.core import exact_log_likelihood
from pssm.lgssm import lgssm
from pssm.locally_linear import locally_linear
from pssm.rssm import rssm

B, T, P, U, S, H = 3, 5, 3, 2, 3, 5  # batch, time, obs, action, stoch, deter


def dense(p, x):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def mlp(p, x):
    """Independent reference of nets.MLP with one hidden layer (ELU)."""
    return dense(p["out"], jax.nn.elu(dense(p["layer0"], x)))


def gru(p, h, x):
    """Independent reference of the GRU equations (Cho et al. 2014, flax's gate layout)."""
    xr, xu, xn = jnp.split(dense(p["dense_i"], x), 3, axis=-1)
    hr, hu, hn = jnp.split(dense(p["dense_h"], h), 3, axis=-1)
    r, u = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xu + hu)
    return (1 - u) * jnp.tanh(xn + r * hn) + u * h


def prior(p, h, min_var=0.01):
    x = jax.nn.elu(dense(p["trunk"]["layer0"], h))
    return dense(p["head"]["mean"], x), jax.nn.softplus(dense(p["head"]["raw_var"], x)) + min_var


def path(z0, z):
    return jnp.concatenate([z0[:, None], jnp.moveaxis(z, 0, 1)], axis=1)


def params_of(tr):
    return {k: v["value"] for k, v in tr.items() if v["type"] == "param"}


@pytest.fixture(scope="module")
def model():
    return rssm(P, U, stoch=S, deter=H, hidden=8)


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 2)
    return jax.random.normal(k[0], (B, T, P)), jax.random.normal(k[1], (B, T, U))


def test_prior_predictive_sites_and_shapes(model, data):
    obs, actions = data
    out = Predictive(model, num_samples=2)(jax.random.key(1), obs, actions)
    assert out["z_0"].shape == (2, B, S) and out["z"].shape == (2, T - 1, B, S)
    assert out["h"].shape == (2, B, T, H) and out["obs"].shape == (2, B, T, P)
    np.testing.assert_array_equal(out["h"][:, :, 0], 0.0)  # h_0 = 0
    assert model.latent_dim == S and model.deterministic_size == H and model.feature_size == H + S
    features = handlers.seed(model, 0)(obs, actions)
    assert features.shape == (B, T, H + S)


def test_conditioned_path_matches_the_rssm_equations(model, data):
    """Condition z: "h", the prior factors and the decoder likelihood equal the GRU / MLP
    equations written out by hand from the trace's parameters."""
    obs, actions = data
    z = jax.random.normal(jax.random.key(2), (B, T, S))
    cond = {"z_0": z[:, 0], "z": jnp.moveaxis(z[:, 1:], 1, 0)}
    tr = handlers.trace(handlers.seed(handlers.condition(model, cond), 0)).get_trace(obs, actions)
    p = params_of(tr)
    det = p["rssm_deterministic$params"]
    h = [jnp.zeros((B, H))]
    for t in range(1, T):
        x = jax.nn.elu(
            dense(det["inputs"]["layer0"], jnp.concatenate([z[:, t - 1], actions[:, t - 1]], -1))
        )
        h.append(gru(det["gru"]["cell"], h[-1], x))
    h = jnp.stack(h, axis=1)
    np.testing.assert_allclose(tr["h"]["value"], h, rtol=1e-10, atol=1e-12)
    mean, var = prior(p["rssm_prior$params"], h)
    lp = stats.norm.logpdf(np.asarray(z), mean, np.sqrt(var)).sum(-1)  # (B, T)
    np.testing.assert_allclose(tr["z_0"]["fn"].log_prob(z[:, 0]), lp[:, 0], rtol=1e-10)
    np.testing.assert_allclose(tr["z"]["fn"].log_prob(tr["z"]["value"]), lp[:, 1:].T, rtol=1e-10)
    dec = mlp(p["rssm_decoder_obs$params"], jnp.concatenate([h, z], -1))
    expected = stats.norm.logpdf(np.asarray(obs), dec, 1.0).sum((-1, -2))
    np.testing.assert_allclose(tr["obs"]["fn"].log_prob(obs), expected, rtol=1e-10)


def test_masked_modalities_contribute_nothing():
    m = rssm({"pos": 2, "vel": 1}, 0, stoch=S, deter=H, hidden=8, learn_obs_var=True)
    k = jax.random.split(jax.random.key(3), 2)
    obs = {"pos": jax.random.normal(k[0], (B, T, 2)), "vel": jax.random.normal(k[1], (B, T, 1))}
    mask = np.ones((B, T, 2), bool)
    mask[0, 1, 0] = mask[2, :3, 1] = False
    obs["vel"] = obs["vel"].at[2, :3].set(jnp.nan)
    tr = handlers.trace(handlers.seed(m, 0)).get_trace(obs, None, mask)
    p = params_of(tr)
    features = jnp.concatenate([tr["h"]["value"], path(tr["z_0"]["value"], tr["z"]["value"])], -1)
    for k, name in enumerate(obs):
        mean = mlp(p[f"rssm_decoder_{name}$params"], features)
        sd = np.sqrt(p[f"rssm_obs_var_{name}"])
        dense_lp = stats.norm.logpdf(np.nan_to_num(np.asarray(obs[name])), mean, sd).sum(-1)
        expected = np.where(mask[..., k], dense_lp, 0.0).sum(-1)
        site = tr[f"obs_{name}"]
        np.testing.assert_allclose(site["fn"].log_prob(site["value"]), expected, rtol=1e-10)


# --- the amortised filtering guide ---------------------------------------------------------------


def test_guide_sites_and_no_dependence_on_future_observations(model, data):
    obs, actions = data
    guide = filtering(model, hidden=8)
    tr = handlers.trace(handlers.seed(guide, 4)).get_trace(obs, actions)
    assert tr["z_0"]["value"].shape == (B, S) and tr["z"]["value"].shape == (T - 1, B, S)
    assert {"rssm_deterministic$params", "filter_net$params"} <= set(params_of(tr))
    z = handlers.seed(guide, 4)(obs, actions)
    z_changed = handlers.seed(guide, 4)(obs.at[:, 3].add(1.0), actions)
    np.testing.assert_array_equal(z[:, :3], z_changed[:, :3])  # q(z_t) sees o_{0:t} only
    assert np.all(np.abs(z[:, 3:] - z_changed[:, 3:]).max(-1) > 0)


def test_guide_on_a_multimodal_model_without_deterministic_path():
    """On the locally-linear model (no deterministic path; inputs z_{t-1}, a_{t-1}, o_t): the
    modalities enter in the model's order whatever the dict's order, masked entries (NaN here)
    are ignored, and q(z_t) does not see o_{t+1:}."""
    model = locally_linear({"a": 2, "b": 1}, S, action_dim=U, hidden=4)
    guide = filtering(model, hidden=8)
    k = jax.random.split(jax.random.key(12), 3)
    obs = {"a": jax.random.normal(k[0], (B, T, 2)), "b": jax.random.normal(k[1], (B, T, 1))}
    actions = jax.random.normal(k[2], (B, T, U))
    mask = np.ones((B, T, 2), bool)
    mask[1, 2, 0] = False
    sample = lambda o: handlers.seed(guide, 3)(o, actions, mask)
    z = sample(obs)
    assert z.shape == (B, T, S)
    np.testing.assert_array_equal(sample({"b": obs["b"], "a": obs["a"]}), z)
    np.testing.assert_array_equal(sample(dict(obs, a=obs["a"].at[1, 2].set(jnp.nan))), z)
    z_changed = sample(dict(obs, b=obs["b"].at[:, 2].add(1.0)))
    np.testing.assert_array_equal(z_changed[:, :2], z[:, :2])
    assert np.all(np.abs(z_changed[:, 2:] - z[:, 2:]).max(-1) > 0)


def test_guide_reads_the_models_deterministic_path(model, data):
    """The guide's h_t comes from the model's (shared) parameter site: perturbing it leaves
    q(z_0 | h_0 = 0, o_0) alone and moves every later factor."""
    obs, actions = data
    guide = filtering(model, hidden=8)
    p = params_of(handlers.trace(handlers.seed(guide, 0)).get_trace(obs, actions))
    shifted = jax.tree.map(lambda x: 1.5 * x + 0.1, p["rssm_deterministic$params"])
    moved = dict(p, **{"rssm_deterministic$params": shifted})
    z = handlers.seed(handlers.substitute(guide, p), 5)(obs, actions)
    z_moved = handlers.seed(handlers.substitute(guide, moved), 5)(obs, actions)
    np.testing.assert_array_equal(z[:, 0], z_moved[:, 0])
    assert np.all(np.abs(z[:, 1:] - z_moved[:, 1:]).max(-1) > 0)


def test_rssm_trains_with_filtering_guide():
    """Noisy sinusoids driven by actions: TraceMeanField_ELBO (the RSSM objective) falls and
    stays finite; the model's and guide's parameter sites are one set."""
    n = 8
    t = jnp.arange(T)
    phase = jax.random.uniform(jax.random.key(6), (n, 1, 1), maxval=6.0)
    obs = jnp.sin(0.8 * t[None, :, None] + phase) * jnp.arange(1.0, P + 1)
    data = {"obs": obs, "actions": jax.random.normal(jax.random.key(7), (n, T, U))}
    model = rssm(P, U, stoch=S, deter=H, hidden=16)
    guide = filtering(model, hidden=16)
    objective = training.elbo_objective(model, guide, TraceMeanField_ELBO())
    optimizer = optax.adam(1e-2)
    init = jax.jit(lambda key, batch: training.init_train_state(objective, optimizer, key, batch))
    state, history = training.fit(
        objective, data, optimizer, num_steps=40, batch_size=n, steps_per_call=40,
        state=init(jax.random.key(8), data), progress=False,
    )  # fmt: skip
    losses = np.array([r["loss"] for r in history])
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:5].mean() - 0.2 * abs(losses[:5].mean())
    assert set(state.params) == {
        "filter_net$params", "rssm_deterministic$params", "rssm_prior$params",
        "rssm_decoder_obs$params",
    }  # fmt: skip
    # the trained pair under Predictive: posterior samples of the path and the features
    out = Predictive(model, guide=guide, params=objective.constrain(state.params), num_samples=2,
                     return_sites=["z_0", "z", "h", "obs"])(jax.random.key(9), **data)  # fmt: skip
    assert out["z"].shape == (2, T - 1, n, S) and out["h"].shape == (2, n, T, H)


def test_particles_and_jit_of_a_guide_first_traced_under_jit(model, data):
    """A fresh guide first built inside jit holds concrete initial weights (usable eagerly
    afterwards); multi-particle Trace_ELBO and its gradient are finite under jit."""
    obs, actions = data
    guide = filtering(model, hidden=8)
    z_jit = jax.jit(lambda key: handlers.seed(guide, key)(obs, actions))(jax.random.key(1))
    z_eager = handlers.seed(guide, jax.random.key(1))(obs, actions)
    np.testing.assert_allclose(z_jit, z_eager, rtol=1e-9, atol=1e-12)
    p = params_of(handlers.trace(handlers.seed(model, 0)).get_trace(obs, actions))
    p.update(params_of(handlers.trace(handlers.seed(guide, 0)).get_trace(obs, actions)))
    loss = lambda params, key: Trace_ELBO(num_particles=3).loss(
        key, params, model, guide, obs, actions
    )
    value, grads = jax.jit(jax.value_and_grad(loss))(p, jax.random.key(2))
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(jax.tree.leaves(grads["rssm_deterministic$params"])[0]).max() > 0


# --- the filtering guide on the textbook LGSSM -------------------------------------------------

A = np.diag([0.9, 0.7])
Q = np.diag([0.1, 0.2])
R = np.diag([0.3, 0.1])


def _simulate(n, steps, rng):
    """LGSSM data (m0 = 0, P0 = I, H = I) by a plain NumPy loop."""
    z = rng.standard_normal((n, 2))
    obs = []
    for _ in range(steps):
        obs.append(z + rng.standard_normal((n, 2)) @ np.sqrt(R))
        z = z @ A.T + rng.standard_normal((n, 2)) @ np.sqrt(Q)
    return np.stack(obs, axis=1)


def _dense_log_likelihood(obs):
    """Independent reference: log N(vec(o_{0:T-1}); 0, Sigma) with the joint covariance
    Cov(o_s, o_t) = A^(t-s) P_s + R 1{s = t}, P_{t+1} = A P_t A' + Q, P_0 = I."""
    steps = obs.shape[1]
    P = [np.eye(2)]
    for _ in range(steps - 1):
        P.append(A @ P[-1] @ A.T + Q)
    cov = np.zeros((2 * steps, 2 * steps))
    for s_ in range(steps):
        for t in range(s_, steps):
            block = np.linalg.matrix_power(A, t - s_) @ P[s_] + (R if t == s_ else 0)
            cov[2 * t : 2 * t + 2, 2 * s_ : 2 * s_ + 2] = block
            cov[2 * s_ : 2 * s_ + 2, 2 * t : 2 * t + 2] = block.T
    flat = obs.reshape(obs.shape[0], -1)
    return stats.multivariate_normal(np.zeros(2 * steps), cov).logpdf(flat)


def _elbo_estimator(model, guide, obs, num=100):
    """``params -> (per-sequence ELBO estimate, its Monte Carlo standard error)``, jitted."""
    keys = jax.random.split(jax.random.key(11), num)

    @jax.jit
    def values(params):
        one = lambda key: -Trace_ELBO().loss(key, params, model, guide, obs) / obs.shape[0]
        return jax.vmap(one)(keys)

    def estimate(params):
        v = values(jax.device_get(params))  # host arrays: one compilation for every call
        return float(v.mean()), float(v.std() / np.sqrt(num))

    return estimate


def test_amortised_filtering_on_lgssm_bounds_and_approaches_closed_form():
    """On a diagonal LGSSM the amortised guide's ELBO is below the exact log-likelihood (within
    Monte Carlo error) before and after training, and training brings it up to (at least) the
    ELBO of the closed-form filtering guide q(z_t | z_{t-1}, o_t) = p(z_t | z_{t-1}, o_t)."""
    model = lgssm(A, Q, np.eye(2), R)
    n = 32
    obs = jnp.asarray(_simulate(n, 8, np.random.default_rng(0)))
    exact = _dense_log_likelihood(np.asarray(obs))
    kalman = jax.jit(lambda o: exact_log_likelihood(model, {}, o))(obs)
    np.testing.assert_allclose(kalman, exact, rtol=1e-10)
    exact = exact.mean()
    closed_form, cf_se = _elbo_estimator(model, closed_form_filtering(model), obs)({})
    guide = filtering(model, hidden=32)
    objective = training.elbo_objective(model, guide, TraceMeanField_ELBO())
    optimizer = optax.adam(optax.exponential_decay(3e-2, 300, 0.1))
    init = jax.jit(lambda key, batch: training.init_train_state(objective, optimizer, key, batch))
    state = init(jax.random.key(1), {"obs": obs})  # initialisation works under jit too
    amortised = _elbo_estimator(model, guide, obs)
    before, before_se = amortised(objective.constrain(state.params))
    state, _ = training.fit(
        objective, {"obs": obs}, optimizer, num_steps=300, batch_size=n, steps_per_call=300,
        state=state, progress=False,
    )  # fmt: skip
    after, after_se = amortised(objective.constrain(state.params))
    assert closed_form < exact + 4 * cf_se
    assert before < exact + 4 * before_se and after < exact + 4 * after_se
    assert before < closed_form - 1.0  # an untrained network is far from it ...
    assert after > closed_form - 0.1  # ... training reaches it
    assert exact - after < 0.2 * (exact - before)


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch",
    [
        dict(obs=jnp.zeros((B, T, P + 1)), actions=jnp.zeros((B, T, U))),
        dict(obs=jnp.zeros((B, T, P)), actions=jnp.zeros((B, T - 1, U))),
        dict(obs=jnp.zeros((B, T, P)), actions=jnp.zeros((B, T, U)), mask=np.ones((B, T + 1))),
        dict(obs=jnp.zeros((B, T, P)), actions=jnp.zeros((B, T, U)), mask=np.ones((B, T, 2))),
        dict(obs=jnp.zeros((B, T, P)).at[1, 2, 0].set(jnp.nan), actions=jnp.zeros((B, T, U))),
        dict(obs=jnp.zeros((B, T, P)), actions=jnp.zeros((B, T, U)).at[0, 0, 0].set(jnp.inf)),
    ],
    ids=["obs size", "actions length", "mask length", "mask sensors", "NaN", "inf action"],
)
def test_bad_inputs_raise_before_training(model, batch):
    objective = training.elbo_objective(model, filtering(model, hidden=4), TraceMeanField_ELBO())
    with pytest.raises(ValueError):
        training.fit(objective, batch, optax.adam(1e-3), num_steps=1, batch_size=B,
                     key=jax.random.key(0), progress=False)  # fmt: skip
