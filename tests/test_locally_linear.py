"""Tests of pssm.nets and the locally-linear latent SSM: the bounded activations, sites and
shapes, the latent LGSSM it declares, masked multi-modal likelihoods against a hand computation,
training with the Kalman guides, and clear errors for bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.util import constrain_fn
from scipy import stats

from inference import training
from inference.guides import backward_sampling, kalman_smoothing
from pssm import nets
from pssm.locally_linear import locally_linear

B, T, D, U = 4, 6, 3, 1
DIMS = {"a": 2, "b": 3}


def mlp(params, x):
    """Independent reference for nets.MLP with one hidden layer (ELU)."""
    h = jax.nn.elu(x @ params["layer0"]["kernel"] + params["layer0"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def path(tr):
    return jnp.concatenate([tr["z_0"]["value"][:, None], jnp.moveaxis(tr["z"]["value"], 0, 1)], 1)


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 3)
    obs = {"a": jax.random.normal(k[0], (B, T, 2)), "b": jax.random.normal(k[1], (B, T, 3))}
    actions = jax.random.normal(k[2], (B, T, U))
    mask = np.ones((B, T, 2), bool)
    mask[0, 2, 1] = mask[1, 4, 0] = False
    mask[2, 3] = False  # a fully missing step
    obs["b"] = obs["b"].at[0, 2].set(jnp.nan)  # missing entries may hold NaN
    obs["a"] = obs["a"].at[2, 3].set(jnp.nan)
    return obs, actions, mask


@pytest.fixture(scope="module")
def model():
    return locally_linear(DIMS, D, action_dim=U, hidden=8, learn_obs_var=True, obs_var=0.5)


# --- networks ---------------------------------------------------------------------------------


@given(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from([(0.1, 0.99, 0.9), (1e-3, 0.1, 1e-2), (-2.0, 3.0, 0.0)]),
)
def test_scaled_sigmoid_bounds_value_at_zero_and_monotone(x, y, bounds):
    lo, hi, v0 = bounds
    f = lambda v: float(nets.scaled_sigmoid(jnp.asarray(v), lo, hi, v0))
    assert lo <= f(x) <= hi
    assert f(0.0) == pytest.approx(v0, rel=1e-12)
    if x < y:
        assert f(x) <= f(y)
    # the closed form: the sigmoid's argument is shifted by logit((v0 - lo) / (hi - lo))
    p = (v0 - lo) / (hi - lo)
    with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0 gives f = lo, as it should
        assert f(x) == pytest.approx(lo + (hi - lo) / (1 + (1 - p) / p * np.exp(-x)), abs=1e-12)


def test_scaled_sigmoid_rejects_bad_bounds():
    with pytest.raises(ValueError):
        nets.scaled_sigmoid(jnp.zeros(()), 0.1, 0.99, 0.995)


def test_gaussian_head_initial_variance_and_floor():
    head = nets.GaussianHead(3, 2, min_var=0.01, init_var=0.5, rngs=nnx.Rngs(0))
    mean, var = head(jnp.zeros(3))
    np.testing.assert_allclose(var, 0.5, rtol=1e-12)
    np.testing.assert_allclose(mean, 0.0)
    _, var = head(jnp.full((5, 3), -1e4))
    assert np.all(var >= 0.01)


def test_random_nnx_module_samples_the_weights():
    net = nets.MLP(2, [3], 1, rngs=nnx.Rngs(0))

    def bnn(x):
        return nets.register("bnn", net, prior=dist.Normal(0.0, 1.0))(x)

    tr = handlers.trace(handlers.seed(bnn, 1)).get_trace(jnp.ones(2))
    weights = {k: v["value"] for k, v in tr.items() if v["type"] == "sample"}
    assert {"bnn/layer0.kernel", "bnn/out.bias"} <= set(weights)
    x = jnp.array([0.3, -0.7])
    params = {
        layer: {p: weights[f"bnn/{layer}.{p}"] for p in ("kernel", "bias")}
        for layer in ("layer0", "out")
    }
    np.testing.assert_allclose(handlers.seed(bnn, 1)(x), mlp(params, x), rtol=1e-12)
    assert not np.allclose(handlers.seed(bnn, 1)(x), handlers.seed(bnn, 2)(x))


# --- the model ----------------------------------------------------------------------------------


def test_prior_predictive_sites_and_shapes(model, data):
    obs, actions, mask = data
    samples = Predictive(model, num_samples=2)(jax.random.key(1), obs, actions, mask)
    assert samples["z_0"].shape == (2, B, D)
    assert samples["z"].shape == (2, T - 1, B, D)
    assert samples["obs_a"].shape == (2, B, T, 2) and samples["obs_b"].shape == (2, B, T, 3)
    assert all(np.isfinite(v).all() for v in samples.values())
    single = locally_linear(4, D, hidden=8)
    out = Predictive(single, num_samples=3)(jax.random.key(2), jnp.zeros((B, T, 4)))
    assert out["obs"].shape == (3, B, T, 4) and out["z"].shape == (3, T - 1, B, D)
    assert single.latent_dim == D and single.obs_dims == {"obs": 4}


def test_structure_is_the_documented_diagonal_lgssm(model, data):
    obs, actions, mask = data
    with handlers.seed(rng_seed=0):
        s = model.structure(obs, actions, mask)
    assert s.prior.mean.shape == s.prior.cov.shape == (B, D)
    assert s.dynamics.A.shape == s.dynamics.b.shape == s.dynamics.Q.shape == (B, T - 1, D)
    assert s.emissions.w.shape == s.emissions.R.shape == (B, T, 2, D)
    np.testing.assert_array_equal(s.emissions.mask, mask)
    assert np.all((s.dynamics.A > 0.1) & (s.dynamics.A < 0.99))
    assert np.all((s.dynamics.Q > 1e-3) & (s.dynamics.Q < 0.1))
    assert np.all(s.emissions.R > 0)
    np.testing.assert_allclose(s.prior.cov, 1.0)
    # the dynamics see only observed modalities: changing a masked entry changes nothing
    changed = dict(obs, b=obs["b"].at[0, 2].set(100.0))
    with handlers.seed(rng_seed=0):
        s2 = model.structure(changed, actions, mask)
    jax.tree.map(np.testing.assert_array_equal, s.dynamics, s2.dynamics)
    # ... while an observed entry at step t changes the transition t -> t + 1 and no other
    changed = dict(obs, a=obs["a"].at[0, 1].add(1.0))
    with handlers.seed(rng_seed=0):
        s3 = model.structure(changed, actions, mask)
    differs = np.any(s3.dynamics.A != s.dynamics.A, axis=-1)
    assert differs[0, 1] and differs.sum() == 1


def test_conditioned_latents_give_masked_likelihood_of_the_decoders(model, data):
    """The obs sites' log-densities equal a hand computation over the unmasked modalities and
    steps only, with the decoder means at the conditioned z."""
    obs, actions, mask = data
    for seed in (0, 1):
        z = jax.random.normal(jax.random.key(10 + seed), (B, T, D))
        cond = {"z_0": z[:, 0], "z": jnp.moveaxis(z[:, 1:], 1, 0)}
        tr = handlers.trace(handlers.seed(handlers.condition(model, cond), seed)).get_trace(
            obs, actions, mask
        )
        np.testing.assert_array_equal(path(tr), z)
        for k, name in enumerate(DIMS):
            site = tr[f"obs_{name}"]
            mean = mlp(tr[f"ll_decoder_{name}$params"]["value"], z)
            sd = np.sqrt(tr[f"ll_obs_var_{name}"]["value"])
            np.testing.assert_allclose(sd, np.sqrt(0.5))
            dense = stats.norm.logpdf(np.nan_to_num(np.asarray(obs[name])), mean, sd).sum(-1)
            expected = np.where(mask[..., k], dense, 0.0).sum(-1)  # per sequence
            np.testing.assert_allclose(site["fn"].log_prob(site["value"]), expected, rtol=1e-10)


def test_single_modality_step_mask(data):
    """A (B, T) mask on one array: masked steps contribute nothing (and may hold NaN)."""
    obs = data[0]["b"]
    step_mask = np.ones((B, T), bool)
    step_mask[0, 2] = False
    m = locally_linear(3, D, hidden=8)
    tr = handlers.trace(handlers.seed(m, 0)).get_trace(obs, None, step_mask)
    mean = mlp(tr["ll_decoder_obs$params"]["value"], path(tr))
    dense = stats.norm.logpdf(np.nan_to_num(np.asarray(obs)), mean, 1.0).sum(-1)
    expected = np.where(step_mask, dense, 0.0).sum(-1)
    np.testing.assert_allclose(tr["obs"]["fn"].log_prob(tr["obs"]["value"]), expected, rtol=1e-10)


@pytest.mark.parametrize(
    "make_guide, elbo",
    [(kalman_smoothing, TraceMeanField_ELBO()), (backward_sampling, Trace_ELBO())],
    ids=["kalman_smoothing", "backward_sampling"],
)
def test_trains_with_kalman_guides(make_guide, elbo):
    """Noisy sinusoids with actions and missing data: the loss falls and stays finite, and the
    encoders are one parameter shared by the model and the Kalman guide."""
    n = 16
    t = jnp.arange(T)
    phase = jax.random.uniform(jax.random.key(3), (n, 1, 1), maxval=6.0)
    clean = jnp.sin(0.7 * t[None, :, None] + phase)
    noise = 0.05 * jax.random.normal(jax.random.key(4), (n, T, 3))
    obs = {"a": clean[..., :1] * jnp.ones(2), "b": clean * jnp.arange(1.0, 4.0) + noise}
    mask = np.ones((n, T, 2), bool)
    mask[::3, 2, 0] = False
    data = {"obs": obs, "actions": jnp.zeros((n, T, U)), "mask": mask}
    model = locally_linear(DIMS, D, action_dim=U, hidden=16)
    guide = make_guide(model)
    objective = training.elbo_objective(model, guide, elbo)
    state, history = fit(objective, data, num_steps=40)
    losses = np.array([r["loss"] for r in history])
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[:5].mean() - 0.2 * abs(losses[:5].mean())
    # the guide's encoders (read through model.structure) are the model's: one entry each
    assert set(state.params) == {
        "ll_encoder_a$params", "ll_encoder_b$params", "ll_dynamics$params", "ll_m0", "ll_P0",
        "ll_decoder_a$params", "ll_decoder_b$params",
    }  # fmt: skip


ADAM = optax.adam(1e-2)


def fit(objective, data, num_steps, optimizer=ADAM, seed=5):
    """``training.fit`` on all sequences from a jit-compiled initial state (much cheaper than
    NumPyro's eager initialisation of scan-based programs)."""
    init = jax.jit(lambda key, batch: training.init_train_state(objective, optimizer, key, batch))
    n = jax.tree.leaves(data)[0].shape[0]
    return training.fit(
        objective, data, optimizer, num_steps=num_steps, batch_size=n, steps_per_call=num_steps,
        state=init(jax.random.key(seed), data), progress=False,
    )  # fmt: skip


def _bad_inputs():
    k = jax.random.split(jax.random.key(7), 2)
    obs = {"a": jax.random.normal(k[0], (B, T, 2)), "b": jax.random.normal(k[1], (B, T, 3))}
    act = jnp.zeros((B, T, U))
    nan = dict(obs, a=obs["a"].at[1, 3, 0].set(jnp.nan))
    return {
        "wrong feature size": dict(obs=dict(obs, b=obs["b"][..., :2]), actions=act),
        "actions too long": dict(obs=obs, actions=jnp.zeros((B, T + 1, U))),
        "wrong action size": dict(obs=obs, actions=jnp.zeros((B, T, 2))),
        "missing actions": dict(obs=obs),
        "wrong mask shape": dict(obs=obs, actions=act, mask=np.ones((B, T, 3), bool)),
        "mask of wrong length": dict(obs=obs, actions=act, mask=np.ones((B, T - 1), bool)),
        "unmasked NaN": dict(obs=nan, actions=act),
        "NaN masked in the other modality": dict(
            obs=nan, actions=act, mask=np.ones((B, T, 2), bool) & (np.arange(2) == 0)
        ),
        "missing modality": dict(obs={"a": obs["a"]}, actions=act),
        "array for a dict model": dict(obs=obs["a"], actions=act),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_before_training(case):
    model = locally_linear(DIMS, D, action_dim=U, hidden=4)
    objective = training.elbo_objective(model, kalman_smoothing(model), TraceMeanField_ELBO())
    with pytest.raises(ValueError):
        training.fit(objective, _bad_inputs()[case], optax.adam(1e-3), num_steps=1, batch_size=B,
                     key=jax.random.key(0), progress=False)  # fmt: skip


def test_nan_where_masked_is_accepted():
    obs = _bad_inputs()["unmasked NaN"]["obs"]
    mask = np.ones((B, T, 2), bool)
    mask[1, 3, 0] = False
    model = locally_linear(DIMS, D, action_dim=U, hidden=4)
    loss = Trace_ELBO().loss(
        jax.random.key(0), {}, model, kalman_smoothing(model), obs, jnp.zeros((B, T, U)), mask
    )
    assert np.isfinite(loss)


def test_learned_observation_variance_keeps_its_floor():
    """The learned decoder variance is a constrained parameter: any unconstrained value maps
    above ``min_obs_var``."""
    model = handlers.seed(locally_linear(2, D, hidden=4, learn_obs_var=True, min_obs_var=0.05), 0)
    unconstrained = {"ll_obs_var_obs": jnp.array([-50.0, 0.0])}
    values = constrain_fn(model, (jnp.zeros((B, T, 2)),), {}, unconstrained)
    np.testing.assert_allclose(values["ll_obs_var_obs"], [0.05, 1.05], rtol=1e-12)
