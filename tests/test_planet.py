"""PlaNet's CEM planner on the analytic toy world model (tests/toy_world_model.py).

Toy: ``z' = A z + B a`` (no imagined noise unless asked), reward ``-|z' - target|^2``, exact
Kalman filtering. With ``A_0 = 1`` and a reachable target, the return's unique maximiser moves
the state onto the target with the first action and holds it there, so the optimal first action
is ``clip((target - A m) / B, -1, 1)`` for the filtered mean ``m``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rl import world_model as W
from rl.agents.planet import PLANET_CPU, Plan, PlanetConfig, planet
from tests.toy_world_model import ToyBelief, toy_world_model

TOY = dict(A=jnp.array([1.0, 0.9]), B=jnp.array([0.5, 0.8]), r=1e-4, q=1e-2, p0=1.0)
TARGET = jnp.array([0.3, -0.2])
CONFIG = PlanetConfig(horizon=4, candidates=300, iterations=10, top_k=30)
ALL = jnp.ones(3, bool)  # every test of the shared agent runs 3 episodes with a mask: one compile


class Acting:
    """PlaNet acting through the generic online filter (:func:`rl.world_model.act`), jitted."""

    def __init__(self, wm, agent):
        self.wm, self.agent = wm, agent
        self.act = jax.jit(lambda p, acting, key, obs, mask, explore: W.act(
            wm, agent, p, (), acting, key, obs, mask, explore))  # fmt: skip

    def init(self, params, batch):
        return W.start_acting(self.wm, self.agent, params, batch)

    def __getattr__(self, name):  # plan, returns: the planner's own
        return getattr(self.agent, name)


@pytest.fixture(scope="module")
def toy():
    wm, params = toy_world_model(2, target=TARGET, **TOY)
    return wm, params, Acting(wm, planet(wm, CONFIG))


def kalman_update(mean, var, obs, r):
    gain = var / (var + r)
    return mean + gain * (obs - mean), (1 - gain) * var


def test_cem_finds_the_optimal_first_action(toy):
    wm, params, agent = toy
    obs = jnp.array([[0.0, 0.0], [0.1, -0.1], [-0.5, 0.0]])
    state = agent.init(params, 3)
    action, state = agent.act(params, state, jax.random.key(0), obs, ALL, False)

    m, v = kalman_update(0.0, 1.0, obs, 1e-4)
    np.testing.assert_allclose(state.belief.mean, m, atol=1e-12)
    np.testing.assert_allclose(state.belief.var, jnp.broadcast_to(v, (3, 2)), atol=1e-12)
    optimal = jnp.clip((TARGET - TOY["A"] * m) / TOY["B"], -1, 1)
    # the third episode's first dimension is clipped: the target is out of one step's reach
    assert optimal[2, 0] == 1.0
    np.testing.assert_allclose(action, optimal, atol=0.03)
    np.testing.assert_array_equal(state.prev_action, action)
    assert not state.first.any()


def test_online_filtering_imagines_with_the_previous_action_then_observes(toy):
    wm, params, agent = toy
    state = agent.init(params, 3)
    o0 = jnp.array([[0.2, 0.1], [0.0, 0.0], [-0.3, 0.3]])
    o1 = o0 + jnp.array([0.15, -0.2])
    a0, state = agent.act(params, state, jax.random.key(1), o0, ALL, False)
    m, v = kalman_update(0.0, 1.0, o0, 1e-4)
    _, state = agent.act(params, state, jax.random.key(2), o1, ALL, False)
    m, v = kalman_update(TOY["A"] * m + TOY["B"] * a0, TOY["A"] ** 2 * v + 1e-2, o1, 1e-4)
    np.testing.assert_allclose(state.belief.mean, m, atol=1e-12)
    np.testing.assert_allclose(state.belief.var, np.broadcast_to(v, (3, 2)), atol=1e-12)

    # a masked observation leaves the predicted belief; a reset restarts from the prior
    mask = jnp.array([True, False, True])
    _, masked = agent.act(params, state, jax.random.key(3), o1 + 5.0, mask, False)
    predicted = TOY["A"] * m + TOY["B"] * state.prev_action
    np.testing.assert_allclose(masked.belief.mean[1], predicted[1], atol=1e-12)
    assert np.abs(masked.belief.mean[0] - predicted[0]).min() > 1.0
    state = W.reset_acting(state)
    assert state.first.all() and (state.prev_action == 0).all()
    _, state = agent.act(params, state, jax.random.key(4), o0, ALL, False)
    np.testing.assert_allclose(state.belief.mean, kalman_update(0.0, 1.0, o0, 1e-4)[0])


def test_reset_only_the_finished_episodes(toy):
    wm, params, agent = toy
    state = agent.init(params, 3)
    _, state = agent.act(params, state, jax.random.key(0), jnp.zeros((3, 2)), ALL, False)
    reset = W.reset_acting(state, jnp.array([False, True, False]))
    np.testing.assert_array_equal(reset.first, [False, True, False])
    np.testing.assert_array_equal(
        reset.prev_action, [state.prev_action[0], [0.0, 0.0], state.prev_action[2]]
    )
    with pytest.raises(ValueError, match="done"):
        W.reset_acting(state, jnp.array([True]))
    # the next step restarts the plan of the reset episode only: with a point mass on a plan,
    # the others can only return their shifted plan, the restarted one plans afresh
    plan = jnp.asarray(np.random.default_rng(1).uniform(-0.8, 0.8, state.memory.mean.shape))
    pinned = reset._replace(memory=Plan(plan, jnp.full_like(plan, 1e-7)))
    action, new = agent.act(params, pinned, jax.random.key(1), jnp.zeros((3, 2)), ALL, False)
    np.testing.assert_allclose(action[np.array([0, 2])], plan[np.array([0, 2]), 0], atol=1e-6)
    assert np.abs(action[1] - plan[1, 0]).max() > 1e-3
    assert (new.memory.std[1, :-1] > 1e-3).any()


def test_plan_is_warm_started_from_the_shifted_previous_plan(toy):
    wm, params, agent = toy
    state = agent.init(params, 3)
    _, state = agent.act(params, state, jax.random.key(0), jnp.zeros((3, 2)), ALL, False)
    plan = jnp.asarray(np.random.default_rng(5).uniform(-0.8, 0.8, state.memory.mean.shape))
    # a (near) point mass on a plan: CEM can only return that plan
    state = state._replace(memory=Plan(plan, jnp.full_like(plan, 1e-7)))
    action, new = agent.act(params, state, jax.random.key(6), jnp.zeros((3, 2)), ALL, False)
    np.testing.assert_allclose(action, plan[:, 0], atol=1e-6)
    np.testing.assert_allclose(new.memory.mean[:, :-1], plan[:, 1:], atol=1e-6)
    np.testing.assert_array_equal(new.memory.mean[:, -1], 0.0)
    assert (new.memory.std[:, :-1] < 1e-6).all()
    np.testing.assert_array_equal(new.memory.std[:, -1], CONFIG.init_std)


def test_without_std_shift_the_deviations_restart():
    wm, params = toy_world_model(1, target=0.3)
    cfg = PlanetConfig(
        horizon=3, candidates=20, iterations=2, top_k=5, init_std=0.7, shift_std=False
    )
    agent = planet(wm, cfg)
    plan = jnp.array([[[0.1], [0.2], [0.3]]])
    belief = wm.init_belief(params, 1)
    action, new = agent.act(params, (), Plan(plan, jnp.full_like(plan, 1e-7)), belief,
                            jax.random.key(0), False)  # fmt: skip
    np.testing.assert_allclose(action, [[0.1]], atol=1e-6)
    np.testing.assert_allclose(new.mean, [[[0.2], [0.3], [0.0]]], atol=1e-6)
    np.testing.assert_array_equal(new.std, 0.7)


def test_act_is_deterministic_given_the_key_and_explores_with_noise(toy):
    wm, params, agent = toy
    state = agent.init(params, 3)
    obs = jnp.array([[0.1, 0.0], [0.0, 0.1], [0.0, 0.0]])
    a1, s1 = agent.act(params, state, jax.random.key(7), obs, ALL, True)
    a2, s2 = agent.act(params, state, jax.random.key(7), obs, ALL, True)
    for x, y in zip(jax.tree.leaves((a1, s1)), jax.tree.leaves((a2, s2)), strict=True):
        np.testing.assert_array_equal(x, y)
    a3, _ = agent.act(params, state, jax.random.key(8), obs, ALL, True)
    assert not np.allclose(a1, a3)
    greedy, s4 = agent.act(params, state, jax.random.key(7), obs, ALL, False)
    # the same key plans the same sequence: exploring only adds noise to its first action
    np.testing.assert_array_equal(s4.memory.mean, s1.memory.mean)
    assert np.abs(a1 - greedy).max() > 1e-3 and (np.abs(a1) <= 1).all()


def naive_return(params, z, actions):
    """Sum of rewards of an action sequence (H, u) from state z by a plain loop."""
    total = 0.0
    for a in np.asarray(actions):
        z = np.asarray(params["A"]) * z + np.asarray(params["B"]) * a
        total += -np.sum((z - np.asarray(params["target"])) ** 2)
    return total


def test_candidate_returns_match_a_naive_rollout(toy):
    wm, params, agent = toy
    belief = ToyBelief(jnp.array([[0.2, -0.4]]), jnp.full((1, 2), 0.1))
    actions = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (1, 7, 4, 2)))
    ret = agent.returns(params, belief, jax.random.key(0), actions)
    ref = [naive_return(params, np.array([0.2, -0.4]), a) for a in actions[0]]
    np.testing.assert_allclose(ret[0], ref, rtol=1e-12)


@pytest.mark.parametrize("per_candidate", [True, False])
def test_each_candidate_gets_its_own_dynamics_sample(per_candidate):
    # noise shared over the batch: only per-candidate keys give candidates distinct samples
    wm, params = toy_world_model(1, noise=1.0, shared_noise=True, q=0.1)
    cfg = PlanetConfig(
        horizon=3, candidates=8, iterations=1, top_k=2, per_candidate_keys=per_candidate
    )
    agent = planet(wm, cfg)
    belief = wm.init_belief(params, 1)
    same = jnp.zeros((1, 8, 3, 1))
    ret = agent.returns(params, belief, jax.random.key(0), same)[0]
    assert (np.std(ret) > 1e-3) == per_candidate
    # each is a return of the sampled dynamics: at most the noise-free return 0 from z = 0
    assert (ret < 0).all()


def test_toy_objective_is_the_exact_log_likelihood():
    wm, params = toy_world_model(1, A=0.9, B=0.5, q=0.2, r=0.3, m0=0.1, p0=0.5)
    obs = jnp.array([[[0.3], [-0.2], [0.5]]])
    actions = jnp.array([[[0.4], [-1.0], [0.0]]])
    train, aux = wm.objective.init(jax.random.key(0), {})
    loss, metrics, _ = wm.objective.loss(train, aux, None, {"obs": obs, "actions": actions})
    # dense joint Gaussian of (o_0, o_1, o_2)
    mean, var = [0.1], [0.5]
    for a in actions[0, :2, 0]:
        mean.append(0.9 * mean[-1] + 0.5 * float(a))
        var.append(0.81 * var[-1] + 0.2)
    cov = np.array([[0.9 ** abs(i - j) * var[min(i, j)] for j in range(3)] for i in range(3)])
    ref = stats.multivariate_normal(mean, cov + 0.3 * np.eye(3)).logpdf(obs[0, :, 0])
    np.testing.assert_allclose(-loss, ref, rtol=1e-12)
    # a masked step drops out of the likelihood
    mask = jnp.array([[True, False, True]])
    loss_m, _, _ = wm.objective.loss(
        train, aux, None, {"obs": obs, "actions": actions, "mask": mask}
    )
    keep = [0, 2]
    ref_m = stats.multivariate_normal(
        np.array(mean)[keep], (cov + 0.3 * np.eye(3))[np.ix_(keep, keep)]
    ).logpdf(obs[0, keep, 0])
    np.testing.assert_allclose(-loss_m, ref_m, rtol=1e-12)


def test_config_validation():
    wm, _ = toy_world_model(1)
    with pytest.raises(ValueError, match="top_k"):
        planet(wm, PlanetConfig(candidates=10, top_k=11))
    with pytest.raises(ValueError, match="horizon"):
        planet(wm, PlanetConfig(horizon=0))
    with pytest.raises(ValueError, match="discount"):
        planet(wm, PlanetConfig(discount=0.0))
    assert PLANET_CPU.candidates == 300 and PLANET_CPU.top_k == 30


def test_plan_rejects_misshaped_warm_start(toy):
    wm, params, agent = toy
    belief = wm.init_belief(params, 1)
    with pytest.raises(ValueError, match="shape"):
        agent.plan(params, belief, jax.random.key(0), jnp.zeros((1, 3, 2)), jnp.ones((1, 3, 2)))
