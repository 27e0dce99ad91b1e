"""Lambda-returns and the Dreamer actor-critic on the analytic toy world model.

Toy (tests/toy_world_model.py): ``z' = z + 0.5 a``, reward ``-z'^2``. From ``|z| <= 0.3`` the
optimal action ``a* = -2 z`` reaches the target in one step (inside the action bounds), so the
optimal imagined reward sum is 0 and, for any spread of a stochastic policy, the expected action
that minimises ``E[(z + 0.5 a)^2]`` is ``-2 z``.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl import world_model as W
from rl.agents.dreamer import DreamerConfig, dreamer, flatten_beliefs
from rl.agents.returns import discount_weights, lambda_returns
from tests.toy_world_model import ToyBelief, toy_world_model

# ----------------------------------------------------------------------------- lambda-returns


def naive_lambda_returns(r, v, d, lam):
    """The backward recursion, one element at a time."""
    H = r.shape[0]
    R = np.zeros_like(r)
    nxt = v[H]
    for t in reversed(range(H)):
        R[t] = r[t] + d[t] * ((1 - lam) * v[t + 1] + lam * nxt)
        nxt = R[t]
    return R


def mixture_lambda_returns(r, v, d, lam):
    """Dreamer's Eq. 6: the lambda-weighted mixture of n-step returns V^n_t."""
    H = r.shape[0]
    R = np.zeros_like(r)
    for t in range(H):

        def n_step(n, t=t):
            total, disc = 0.0, 1.0
            for k in range(t, t + n):
                total = total + disc * r[k]
                disc = disc * d[k]
            return total + disc * v[t + n]

        steps = H - t
        mix = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, steps))
        R[t] = mix + lam ** (steps - 1) * n_step(steps)
    return R


_jit_returns = jax.jit(lambda r, v, d, lam: lambda_returns(r, v, d, lam))


@settings(max_examples=20)
@given(
    horizon=st.integers(1, 6),
    lam=st.sampled_from([0.0, 0.3, 0.95, 1.0]),
    per_step=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_lambda_returns_match_the_recursion_and_the_n_step_mixture(horizon, lam, per_step, seed):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(horizon, 2))
    v = rng.normal(size=(horizon + 1, 2))
    d = rng.uniform(0.5, 1.0, size=(horizon, 2)) if per_step else np.full((horizon, 2), 0.97)
    got = _jit_returns(r, v, d if per_step else 0.97, lam)
    np.testing.assert_allclose(got, naive_lambda_returns(r, v, d, lam), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, mixture_lambda_returns(r, v, d, lam), rtol=1e-10, atol=1e-12)


def test_lambda_returns_limits_and_weights():
    rng = np.random.default_rng(0)
    r, v, g = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), 0.9
    # lambda = 0: one-step TD targets; lambda = 1: discounted sum bootstrapped with v_H
    np.testing.assert_allclose(lambda_returns(r, v, g, 0.0), r + g * v[1:], rtol=1e-12)
    mc = [sum(g**k * r[t + k] for k in range(4 - t)) + g ** (4 - t) * v[4] for t in range(4)]
    np.testing.assert_allclose(lambda_returns(r, v, g, 1.0), np.array(mc), rtol=1e-12)
    np.testing.assert_allclose(discount_weights(g, 4, (3,))[:, 0], g ** np.arange(4))
    d = rng.uniform(size=(4, 3))
    w = discount_weights(d)
    np.testing.assert_allclose(w[0], 1.0)
    np.testing.assert_allclose(w[3], d[0] * d[1] * d[2], rtol=1e-12)
    with pytest.raises(ValueError, match="values"):
        lambda_returns(r, v[:-1], g, 0.5)
    with pytest.raises(ValueError, match="discounts"):
        lambda_returns(r, v, d[:2], 0.5)
    with pytest.raises(ValueError, match="lam"):
        lambda_returns(r, v, g, 1.5)


# ----------------------------------------------------------------------------- Dreamer training

CONFIG = DreamerConfig(
    horizon=5,
    gamma=0.9,
    actor_lr=3e-3,
    critic_lr=3e-3,
    actor_hidden=(32, 32),
    critic_hidden=(32, 32),
    target_every=10,
    init_std=0.5,
)
UPDATES, BATCH = 300, 64
PROBE = np.array([[-0.15], [0.0], [0.15]])


def greedy_reward_sum(dist, actor, z):
    """Imagined reward sum of the deterministic policy ``tanh(mu)`` by a plain loop
    (``z' = z + 0.5 a``, reward ``-z'^2``); the optimum is 0."""
    total = np.zeros(z.shape[0])
    for _ in range(CONFIG.horizon):
        a = np.tanh(np.asarray(dist(actor, jnp.asarray(z))[0]))
        z = z + 0.5 * a
        total -= np.sum(z**2, axis=-1)
    return total


def start_beliefs(rng, n):
    mean = rng.uniform(-0.3, 0.3, size=(n, 1))
    return ToyBelief(jnp.asarray(mean), jnp.full((n, 1), 1e-2))


def mean_action(dist, actor, z, n=4000, seed=0):
    """``E[a | z]`` of the (noise-free) tanh-Gaussian policy by Monte Carlo."""
    mu, sigma = (np.asarray(x) for x in dist(actor, jnp.asarray(z)))
    eps = np.random.default_rng(seed).normal(size=(n, *mu.shape))
    return np.tanh(mu + sigma * eps).mean(0)


@pytest.fixture(scope="module")
def trained():
    wm, params = toy_world_model(1)
    params_before = copy.deepcopy(jax.device_get(params))
    agent = dreamer(wm, CONFIG)
    state0 = agent.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    keys = jax.random.split(jax.random.key(2), UPDATES)
    state, history = state0, []
    for i in range(UPDATES):
        state, metrics = agent.train_step(params, state, keys[i], start_beliefs(rng, BATCH))
        history.append(jax.device_get(metrics))

    return dict(
        wm=wm,
        params=params,
        params_before=params_before,
        agent=agent,
        state0=state0,
        state=state,
        history=history,
        dist=jax.jit(agent.actor_dist),
    )


def test_updates_improve_the_imagined_return(trained):
    hist = trained["history"]
    first = np.mean([h["imagined_return"] for h in hist[:10]])
    last = np.mean([h["imagined_return"] for h in hist[-10:]])
    assert last > first + 0.5, (first, last)
    assert np.mean([h["critic_loss"] for h in hist[-10:]]) < 1e-2
    # greedy (tanh(mu)) imagined reward sums against the analytic optimum 0
    probe = np.array([[-0.3], [0.15], [0.25]])
    before = greedy_reward_sum(trained["dist"], trained["state0"].actor, probe)
    after = greedy_reward_sum(trained["dist"], trained["state"].actor, probe)
    assert before.mean() < -0.02 and after.min() > -2e-3, (before, after)
    assert np.isfinite([list(h.values()) for h in hist]).all()


def test_policy_approaches_the_optimal_action(trained):
    dist = trained["dist"]
    optimal = -2.0 * PROBE
    err0 = np.abs(mean_action(dist, trained["state0"].actor, PROBE) - optimal).max()
    err = np.abs(mean_action(dist, trained["state"].actor, PROBE) - optimal).max()
    assert err < 0.08 and err < 0.5 * err0, (err0, err)
    # the policy has become nearly deterministic
    assert float(dist(trained["state"].actor, jnp.asarray(PROBE))[1].max()) < 0.1


def test_target_critic_follows_every_n_updates_and_model_is_untouched(trained):
    agent, params, state = trained["agent"], trained["params"], trained["state"]
    assert int(state.step) == UPDATES and UPDATES % CONFIG.target_every == 0
    for c, t in zip(
        jax.tree.leaves(state.critic), jax.tree.leaves(state.target_critic), strict=True
    ):
        np.testing.assert_array_equal(c, t)
    nxt, _ = agent.train_step(
        params, state, jax.random.key(9), start_beliefs(np.random.default_rng(9), BATCH)
    )
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(nxt.critic), jax.tree.leaves(state.critic), strict=True)
    ]
    assert any(changed)
    for a, b in zip(
        jax.tree.leaves(nxt.target_critic), jax.tree.leaves(state.target_critic), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # the agent never holds, nor changes, the model's parameters
    for k, v in trained["params_before"].items():
        np.testing.assert_array_equal(params[k], v)
    assert set(state._fields) == {
        "actor",
        "critic",
        "target_critic",
        "actor_opt",
        "critic_opt",
        "step",
    }


def test_act_filters_online_and_is_deterministic_given_the_key(trained):
    wm, agent, params, state = trained["wm"], trained["agent"], trained["params"], trained["state"]
    step = jax.jit(lambda acting, key, obs, mask, explore: W.act(
        wm, agent, params, state, acting, key, obs, mask, explore))  # fmt: skip
    acting = W.start_acting(wm, agent, params, 3)
    o0 = jnp.array([[0.2], [-0.1], [0.0]])
    mask = jnp.ones(3, bool)
    a0, acting = step(acting, jax.random.key(0), o0, mask, False)
    gain = 1.0 / (1.0 + 1e-2)  # p0 = 1, r = 1e-2
    m0 = gain * o0
    np.testing.assert_allclose(acting.belief.mean, m0, atol=1e-12)
    np.testing.assert_allclose(a0, np.tanh(trained["dist"](state.actor, m0)[0]), atol=1e-12)
    # second step: imagine with a0, then observe
    o1 = jnp.array([[0.05], [0.0], [0.1]])
    _, acting1 = step(acting, jax.random.key(1), o1, mask, False)
    pm, pv = m0 + 0.5 * a0, (1 - gain) * 1.0 + 1e-2
    np.testing.assert_allclose(acting1.belief.mean, pm + pv / (pv + 1e-2) * (o1 - pm), atol=1e-12)
    # explore: a sample plus noise, reproducible from the key
    e1, s1 = step(acting, jax.random.key(5), o1, mask, True)
    e2, s2 = step(acting, jax.random.key(5), o1, mask, True)
    e3, _ = step(acting, jax.random.key(6), o1, mask, True)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(s1.belief.mean, s2.belief.mean)
    assert not np.allclose(e1, e3) and (np.abs(e1) <= 1).all()
    # reset: the next observation is filtered from the prior again
    reset = W.reset_acting(acting1, jnp.array([True, False, False]))
    np.testing.assert_array_equal(reset.first, [True, False, False])
    _, acting2 = step(reset, jax.random.key(2), o0, mask, False)
    np.testing.assert_allclose(acting2.belief.mean[0], m0[0], atol=1e-12)
    assert abs(float(acting2.belief.mean[1, 0] - m0[1, 0])) > 1e-3


def test_update_takes_one_train_step_per_group_of_windows(trained):
    """The protocol's update on ``updates * start_batch`` filtered windows: train step ``i`` on
    window group ``i``, every step of its windows a start belief (the driver's call)."""
    wm, params, state = trained["wm"], trained["params"], trained["state0"]
    agent = dreamer(wm, CONFIG, start_batch=2)
    rng = np.random.default_rng(4)
    beliefs = ToyBelief(jnp.asarray(rng.uniform(-0.3, 0.3, (4, 3, 1))), jnp.full((4, 3, 1), 0.1))
    assert agent.sequences(2) == 4
    key = jax.random.key(8)
    new, metrics = jax.jit(agent.update, static_argnums=5)(params, state, key, beliefs, {}, 2)
    ref = state
    for i, k in enumerate(jax.random.split(key, 2)):
        group = jax.tree.map(lambda v, i=i: v[2 * i : 2 * i + 2].reshape(6, 1), beliefs)
        ref, _ = agent.train_step(params, ref, k, group)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert int(new.step) == 2 and np.isfinite(float(metrics["actor_loss"]))


# ----------------------------------------------------------------------------- gradients

GRAD_CONFIG = DreamerConfig(horizon=3, actor_hidden=(8,), critic_hidden=(8,), init_std=0.5)


def _loss_and_grads(wm, params, config, seed=0):
    """A jitted ``(actor, model_params) -> (loss, (d/d actor, d/d model))`` (one compile)."""
    agent = dreamer(wm, config)
    state = agent.init(jax.random.key(seed))
    beliefs = ToyBelief(
        jnp.asarray(np.random.default_rng(seed).uniform(-0.5, 0.5, (4, 2))), jnp.full((4, 2), 0.1)
    )

    def loss(actor, model_params):
        value, _ = agent.actor_loss(
            actor, state.target_critic, model_params, jax.random.key(3), beliefs
        )
        return value

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), state.actor


def test_actor_gradient_flows_through_the_dynamics_only_into_the_actor():
    wm, params = toy_world_model(2, A=[1.0, 0.8], B=[0.5, 1.0], noise=0.5, target=[0.2, -0.1])
    # the full pathwise derivative (Dreamer's default stops the gradient of the actor's input
    # features, which makes the gradient differ from the loss's total derivative)
    f, actor = _loss_and_grads(wm, params, GRAD_CONFIG._replace(actor_feature_grad=True))
    loss, (g_actor, g_model) = jax.device_get(f(actor, params))
    # the model's parameters get no gradient from the actor loss
    for g in jax.tree.leaves(g_model):
        np.testing.assert_array_equal(g, 0.0)
    # directional derivative against central finite differences (same key: same noise)
    rng = np.random.default_rng(4)
    actor = jax.device_get(actor)
    direction = jax.tree.map(lambda x: rng.normal(size=x.shape), actor)
    eps = 1e-6
    up = jax.tree.map(lambda x, d: x + eps * d, actor, direction)
    down = jax.tree.map(lambda x, d: x - eps * d, actor, direction)
    fd = (f(up, params)[0] - f(down, params)[0]) / (2 * eps)
    leaves = zip(jax.tree.leaves(g_actor), jax.tree.leaves(direction), strict=True)
    ad = sum(np.vdot(g, d) for g, d in leaves)
    assert abs(ad) > 1e-3
    np.testing.assert_allclose(ad, fd, rtol=1e-6)

    # cut the dynamics' dependence on the action (B = 0): no gradient reaches the actor, since
    # rewards and values see only the imagined states (the same compiled function)
    cut = {**params, "B": jnp.zeros(2)}
    _, (g_cut, _) = jax.device_get(f(actor, cut))
    for g in jax.tree.leaves(g_cut):
        np.testing.assert_array_equal(g, 0.0)


def test_entropy_estimate_matches_quadrature(trained):
    agent, actor = trained["agent"], trained["state0"].actor
    f = jnp.full((20000, 1), 0.3)

    @jax.jit
    def estimate(actor, f, key):
        return agent.entropy(actor, f, key).mean(), agent.actor_dist(actor, f[:1])

    est, (mu, sigma) = estimate(actor, f, jax.random.key(0))
    est, mu, sigma = float(est), float(mu[0, 0]), float(sigma[0, 0])
    assert sigma > 0.3  # a wide policy: the tanh correction matters
    # H[tanh(u)] = H[u] + E log(1 - tanh(u)^2), u ~ N(mu, sigma^2), by Gauss-Hermite quadrature
    x, w = np.polynomial.hermite_e.hermegauss(80)
    u = mu + sigma * x
    ref = 0.5 * np.log(2 * np.pi * np.e * sigma**2) + np.sum(
        w * np.log1p(-(np.tanh(u) ** 2))
    ) / np.sqrt(2 * np.pi)
    assert abs(est - ref) < 0.02, (est, ref)


def test_flatten_beliefs_and_config_validation():
    b = ToyBelief(jnp.arange(24.0).reshape(2, 3, 4), jnp.ones((2, 3, 4)))
    flat = flatten_beliefs(b)
    assert flat.mean.shape == (6, 4)
    np.testing.assert_array_equal(flat.mean[4], b.mean[1, 1])
    wm, _ = toy_world_model(1)
    with pytest.raises(ValueError, match="lam"):
        dreamer(wm, DreamerConfig(lam=1.5))
    with pytest.raises(ValueError, match="init_std"):
        dreamer(wm, DreamerConfig(init_std=1e-5, min_std=1e-4))
    with pytest.raises(ValueError, match="horizon"):
        dreamer(wm, DreamerConfig(horizon=0))
