"""VRKN: the recurrent filter against a naive loop, the free-nats ELBO, masks, MC dropout, the
image path and the world-model adapter. Tiny sizes: every width is 4 so the networks share
shapes (and compilations)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO

from inference import kalman
from inference.guides import kalman_smoothing
from inference.objectives import FreeNatsELBO
from pssm.vrkn import vrkn
from rl.world_model import filter_sequence, imagine_rollout
from rl.world_models.vrkn import vrkn_world_model

D, U, B, T = 4, 2, 3, 5
DIMS = {"a": 4, "b": 3}
SIZES = dict(latent_dim=D, hidden=4, mlp_hidden=4)


@pytest.fixture(scope="module")
def models():
    """``{mc_dropout: (model, params)}``, params with a random initial mean and variance and a
    random transition output layer (it is initialised at zero: the transition would not depend
    on its inputs, and the tests below would not see a wrong input)."""
    out = {}
    for mc_dropout in (True, False):
        model = vrkn(DIMS, U, mc_dropout=mc_dropout, reward=True, **SIZES)
        tr = handlers.trace(model.networks).get_trace()
        params = {k: v["value"] for k, v in tr.items() if v["type"] == "param"}
        rng = np.random.default_rng(1)
        params["vrkn_m0"] = jnp.asarray(rng.normal(size=D))
        params["vrkn_P0"] = jnp.asarray(rng.uniform(0.2, 2.0, size=D))
        trans = params["vrkn_transition$params"]
        trans["out"] = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in trans["out"].items()}
        out[mc_dropout] = model, params
    return out


@pytest.fixture(scope="module")
def world_models():
    """``{mc_dropout: WorldModel}`` around the same models (same sites as ``models``)."""
    return {mcd: vrkn_world_model(DIMS, U, mc_dropout=mcd, **SIZES) for mcd in (True, False)}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    mask = rng.random((B, T, 2)) > 0.3
    mask[0, 2] = False  # a step with no observation at all
    mask[1, 0] = [False, True]
    obs = {"a": rng.normal(size=(B, T, 4)), "b": rng.normal(size=(B, T, 3))}
    obs["b"][~mask[..., 1]] = np.nan  # missing entries may hold anything
    return dict(
        obs=obs, actions=rng.normal(size=(B, T, U)), mask=mask, rewards=rng.normal(size=(B, T))
    )


def test_recurrent_filter_matches_naive_loop(batch, models):
    model, params = models[True]
    args = (batch["obs"], batch["actions"], batch["mask"])
    noise = jax.random.uniform(jax.random.key(1), (B, T - 1, 2 * 4 + D))  # the dropout site

    @jax.jit  # one compilation: the model's structure and filter, the project's Kalman filter
    def run(params, noise):
        with handlers.seed(rng_seed=0), handlers.condition(data={"vrkn_dropout": noise}):
            with handlers.substitute(data=params):
                s, filt = model.structure(*args), model.filter(*args)
        return s, filt, jax.vmap(kalman.filter)(*s).filtered

    s, filt, ref = run(params, noise)
    with handlers.substitute(data=params):
        n = model.networks()
    mask = batch["mask"]
    clean = {
        k: np.where(mask[..., i, None], o, 0.0) for i, (k, o) in enumerate(batch["obs"].items())
    }

    def naive(order):  # one Joseph-form update per observed sensor in turn (official code)
        m = np.broadcast_to(n.initial.mean, (B, D))
        P = np.broadcast_to(n.initial.cov, (B, D))
        means, variances, dyn = [], [], []
        for t in range(T):
            if t > 0:
                a = batch["actions"][:, t - 1]
                A, off, Q = map(np.asarray, n.transition(m, a, noise=noise[:, t - 1]))
                dyn.append((A, off, Q))
                m, P = A * m + off, A**2 * P + Q
            for k in order:
                seen = mask[:, t, list(DIMS).index(k), None]
                w, r = map(np.asarray, n.encoders[k](clean[k][:, t]))
                gain = P / (P + r)
                m = np.where(seen, (1 - gain) * m + gain * w, m)
                P = np.where(seen, (1 - gain) ** 2 * P + gain**2 * r, P)
            means.append(m)
            variances.append(P)
        stack = lambda xs: np.stack(xs, axis=1)
        return stack(means), stack(variances), [stack(x) for x in zip(*dyn, strict=True)]

    for order in (["a", "b"], ["b", "a"]):  # fusion does not depend on the order
        means, variances, (A, off, Q) = naive(order)
        np.testing.assert_allclose(filt.mean, means, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(filt.cov, variances, rtol=1e-9, atol=1e-12)
        for got, want in zip(s.dynamics, (A, off, Q), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all((A > 0.1) & (A < 0.99)) and np.all((Q > 1e-3) & (Q < 0.1))
    # the dropout masks are in effect, and the project's Kalman filter on the structure agrees
    A_plain = n.transition(filt.mean[:, :-1], jnp.asarray(batch["actions"][:, :-1]))[0]
    assert not np.allclose(A_plain, A)
    np.testing.assert_allclose(ref.mean, filt.mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ref.cov, filt.cov, rtol=1e-8, atol=1e-12)


def test_unobserved_coordinates_are_pure_predictions(batch):
    # RKN's H = [I_m, 0]: the encoders emit m = 2 of D = 4 coordinates; the other two are
    # never updated, so they follow the transition alone, and the project's Kalman filter on
    # the structure (unobserved entries marked missing) gives the same beliefs
    model = vrkn(DIMS, U, mc_dropout=False, reward=True, observed_dim=2, **SIZES)
    guide = kalman_smoothing(model)
    args = (batch["obs"], batch["actions"], batch["mask"])
    params = {k: v["value"] for k, v in handlers.trace(model.networks).get_trace().items()}

    @jax.jit
    def run(params, key):
        with handlers.substitute(data=params):
            s, filt = model.structure(*args), model.filter(*args)
        loss, grads = jax.value_and_grad(TraceMeanField_ELBO().loss, argnums=1)(
            key, params, model, guide, **batch
        )
        return s, filt, jax.vmap(kalman.filter)(*s).filtered, loss, grads

    s, filt, ref, loss, grads = run(params, jax.random.key(0))
    A, b, Q = s.dynamics
    np.testing.assert_allclose(ref.mean, filt.mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ref.cov, filt.cov, rtol=1e-8, atol=1e-12)
    memory = slice(2, None)
    np.testing.assert_array_equal(filt.mean[:, 0, memory], np.broadcast_to(np.zeros(2), (B, 2)))
    np.testing.assert_allclose(
        filt.mean[:, 1:, memory], (A * filt.mean[:, :-1] + b)[..., memory], rtol=1e-12
    )
    np.testing.assert_allclose(
        filt.cov[:, 1:, memory], (A**2 * filt.cov[:, :-1] + Q)[..., memory], rtol=1e-12
    )
    seen = batch["mask"].any(-1)[:, 1:]  # observed coordinates do get updated
    assert np.all(filt.cov[:, 1:, :2][seen] < (A**2 * filt.cov[:, :-1] + Q)[:, :, :2][seen])
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads["vrkn_transition$params"]["out"]["kernel"] != 0)
    for bad in (0, D + 1):
        with pytest.raises(ValueError, match="observed_dim"):
            vrkn(DIMS, U, observed_dim=bad, **SIZES)


def test_free_nats_elbo_against_trace_mean_field(batch, models):
    model, params = models[True]
    guide = kalman_smoothing(model)
    key = jax.random.key(3)

    @jax.jit  # one compilation for both
    def losses(params, key):
        reference = TraceMeanField_ELBO().loss(key, params, model, guide, **batch)
        return reference, FreeNatsELBO(1e3).loss_with_metrics(key, params, model, guide, **batch)

    reference, out = losses(params, key)
    # same draws as TraceMeanField_ELBO: the same bound (the dropout site adds exactly 0)
    np.testing.assert_allclose(out["metrics"]["elbo"], -reference, rtol=1e-12)
    # every KL element (B of z_0, (T-1) B of z) sits below 1000 nats: clamped to exactly that
    log_lik, kl = out["metrics"]["log_likelihood"], out["metrics"]["kl"]
    np.testing.assert_allclose(out["loss"], -log_lik + 1e3 * B * T, rtol=1e-12)
    np.testing.assert_allclose(log_lik - kl, -reference, rtol=1e-12)
    assert 0 < float(kl) < 1e3


def test_kalman_smoothing_elbo_trains(batch, world_models):
    # the world model's objective: the Kalman-smoothing guide and free nats (3 per element)
    objective = world_models[True].objective
    params, aux = objective.init(jax.random.key(0), batch)
    opt, key = optax.adam(2e-2), jax.random.key(1)

    @jax.jit
    def train(p):  # 30 Adam steps at one fixed key: a deterministic loss that must fall
        def step(carry, _):
            p, state = carry
            value, grads = jax.value_and_grad(lambda p: objective.loss(p, aux, key, batch)[0])(p)
            finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), (value, finite)

        return jax.lax.scan(step, (p, opt.init(p)), None, length=30)[1]

    values, finite = train(params)
    assert np.all(np.isfinite(values)) and bool(np.all(finite))
    assert values[-1] < values[0] - 0.1 * abs(values[0]), values


def test_masked_entries_change_nothing(batch, models):
    model, params = models[True]
    guide = kalman_smoothing(model)

    @jax.jit
    def sites(batch):
        with handlers.trace() as g, handlers.seed(rng_seed=5), handlers.substitute(data=params):
            guide(**batch)
        with handlers.trace() as m, handlers.seed(rng_seed=6), handlers.replay(trace=g):
            with handlers.substitute(data=params):
                model(**batch)
        # observation sites: log-densities per (sequence, step)
        lp = lambda v: (v["fn"].base_dist if v["is_observed"] else v["fn"]).log_prob(v["value"])
        return {k: (v["value"], lp(v)) for k, v in m.items() if v["type"] == "sample"}

    base = sites(batch)
    obs_b = np.where(batch["mask"][..., 1, None], batch["obs"]["b"], 123.0)
    changed = sites({**batch, "obs": {**batch["obs"], "b": obs_b}})
    assert set(base) == {"vrkn_dropout", "z_0", "z", "obs_a", "obs_b", "reward"}
    assert base["vrkn_dropout"][0].shape == (B, T - 1, 2 * 4 + D)
    for name in base:
        for x, y in zip(base[name], changed[name], strict=True):
            np.testing.assert_array_equal(x, y)
    # a masked step of a modality scores exactly 0; an observed entry matters
    log_b = np.asarray(base["obs_b"][1])
    assert log_b.shape == (B, T) and np.all(log_b[~batch["mask"][..., 1]] == 0.0)
    assert np.all(log_b[batch["mask"][..., 1]] < 0.0)
    b, t = np.argwhere(batch["mask"][..., 1])[0]
    obs_b = obs_b.copy()
    obs_b[b, t, 0] += 1.0
    moved = sites({**batch, "obs": {**batch["obs"], "b": obs_b}})
    assert not np.array_equal(moved["z"][0], base["z"][0])  # filter and posterior see it
    np.testing.assert_array_equal(moved["obs_a"][0], base["obs_a"][0])  # data untouched


@pytest.mark.parametrize("mc_dropout", [True, False])
def test_mc_dropout_predictions_differ_only_when_enabled(batch, models, mc_dropout):
    model, params = models[mc_dropout]
    args = (batch["obs"], batch["actions"], batch["mask"])
    runs = []
    for seed in (0, 1):
        with handlers.seed(rng_seed=seed), handlers.substitute(data=params):
            runs.append(model.structure(*args).dynamics.A)
    assert np.array_equal(runs[0], runs[1]) != mc_dropout


def test_image_modality_likelihood_and_preprocessing():
    dims = {"image": (64, 64, 3), "proprio": 4}
    model = vrkn(dims, U, conv_depth=2, **SIZES)
    rng = np.random.default_rng(0)
    n_b, n_t = 1, 3
    image = rng.integers(0, 256, size=(n_b, n_t, 64, 64, 3), dtype=np.uint8)
    mask = np.array([[[True, True], [False, True], [True, False]]])
    data = dict(
        obs={"image": image, "proprio": rng.normal(size=(n_b, n_t, 4))},
        actions=rng.normal(size=(n_b, n_t, U)),
        mask=mask,
    )

    @jax.jit
    def run(data):  # the image site and the decoder's mean at the sampled path
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(**data)
        site = tr["obs_image"]
        z = jnp.concatenate([tr["z_0"]["value"][:, None], jnp.moveaxis(tr["z"]["value"], 0, 1)], 1)
        mean = model.networks().decoders["image"](z)
        return site["value"], site["fn"].base_dist.log_prob(site["value"]), mean

    value, log_prob, mean = run(data)
    assert value.shape == mean.shape == (n_b, n_t, 64, 64, 3)
    target = np.floor(image / 8.0) / 32.0 - 0.5  # 5-bit colour depth in [-0.5, 0.5]
    np.testing.assert_allclose(value[mask[..., 0]], target[mask[..., 0]])
    ref = -0.5 * ((target - mean) ** 2 + np.log(2 * np.pi)).sum(axis=(2, 3, 4)) * mask[..., 0]
    np.testing.assert_allclose(log_prob, ref, rtol=1e-10)
    assert np.all(log_prob[0, 1] == 0.0)  # the masked image step scores exactly 0


def test_world_model_filter_sequence_matches_model_filter(batch, models, world_models):
    wm = world_models[False]
    model, params = models[False]  # the same model: same arguments, same sites
    obs, actions, mask = batch["obs"], jnp.asarray(batch["actions"]), batch["mask"]

    @jax.jit
    def both(params):
        beliefs = filter_sequence(wm, params, jax.random.key(1), obs, actions, mask)
        with handlers.substitute(data=params):
            return beliefs, model.filter(obs, actions, mask)

    beliefs, filt = both(params)
    np.testing.assert_allclose(beliefs.mean, filt.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(beliefs.var, filt.cov, rtol=1e-10, atol=1e-12)
    f = wm.features(params, jax.tree.map(lambda v: v[:, -1], beliefs))
    assert f.shape == (B, wm.feature_size) and wm.reward(params, f).shape == (B,)
    assert {k: v.shape for k, v in wm.decode(params, f).items()} == {"a": (B, 4), "b": (B, 3)}

    # imagination: differentiable in params and belief; no dropout -> the mean is deterministic
    start = jax.tree.map(lambda v: v[:, -1], beliefs)
    policy = lambda feats, key: jnp.tanh(feats[:, :U])

    def total(p, b):
        feats, acts, rews = imagine_rollout(wm, p, jax.random.key(2), b, policy, 3)
        assert feats.shape == (4, B, D) and acts.shape == (3, B, U) and rews.shape == (3, B)
        return jnp.sum(rews)

    grads = jax.grad(total, argnums=(0, 1))(params, start)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[1].mean).sum()) > 0
    a = jnp.ones((B, U))
    one, two = (wm.imagine(params, jax.random.key(k), start, a) for k in (3, 4))
    np.testing.assert_array_equal(one.mean, two.mean)
    assert not np.array_equal(one.sample, two.sample)
    mcd = world_models[True]
    one, two = (mcd.imagine(params, jax.random.key(k), start, a) for k in (3, 4))
    assert not np.array_equal(one.mean, two.mean)  # fresh dropout masks per key


def test_untrained_transition_is_the_damped_resting_point_and_the_filter_stays_bounded():
    """VRKN's transition starts at ``(A, b, Q) = (0.9, 0, 0.01)`` for every input, so an untrained
    filter is stable on long sequences. With a randomly initialised output layer, ``b_t(mu)`` fed
    the filtered mean back with a gain above 1: at these sizes ``|mu_t|`` reached ~1e3 within 512
    steps of unit-variance data (and overflowed float32 before T = 1024 at VRKN's 230 / 300)."""
    model = vrkn(8, 2, latent_dim=32, hidden=64, mlp_hidden=(64, 64), seed=0)
    with handlers.seed(rng_seed=0):
        n = model.networks()
    rng = np.random.default_rng(0)
    mean = jnp.asarray(rng.normal(scale=5.0, size=(6, 32)), jnp.float32)
    A, b, Q = n.transition(mean, jnp.asarray(rng.normal(size=(6, 2)), jnp.float32))
    np.testing.assert_allclose(A, 0.9, rtol=1e-6)
    np.testing.assert_allclose(b, 0.0, atol=0)
    np.testing.assert_allclose(Q, 0.01, rtol=1e-5)
    obs = jnp.asarray(rng.normal(size=(4, 512, 8)), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, size=(4, 512, 2)), jnp.float32)
    with handlers.seed(rng_seed=0):
        filtered = jax.jit(model.filter)(obs, actions)
    assert np.all(np.isfinite(filtered.mean))
    assert float(jnp.max(jnp.abs(filtered.mean))) < 10.0
