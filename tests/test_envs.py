"""rl.envs: shapes, seeding, action repeat against a naive dm_control loop, variants."""

import math
import os

import numpy as np
import pytest

from rl import envs
from rl.envs import Fusion, ObservationNoise, Occlusion, TransitionNoise, Variant

TASK = "cartpole-swingup"


def raw_env(seed):
    from dm_control import suite

    return suite.load("cartpole", "swingup", task_kwargs={"random": seed})


def flat(observation):
    return np.concatenate([np.ravel(v) for v in observation.values()]).astype(np.float32)


def run(env, actions, render=True):
    ts = env.reset()
    out = [ts]
    for a in actions:
        out.append(env.step(a))
    return out


def test_states_shapes_and_spec():
    assert os.environ.get("MUJOCO_GL")  # set on import of rl.envs
    env = envs.make(TASK, obs="states", seed=0)
    ts = env.reset()
    assert env.action_repeat == 8 and env.episode_length == 125  # 1000 sim steps / 8
    assert env.action_dim == 1 and env.action_low.tolist() == [-1.0]
    assert env.action_high.tolist() == [1.0]
    assert ts.obs.shape == env.observation_shape == (5,) and ts.obs.dtype == np.float32
    assert env.observation_spec.dtype == np.float32
    assert ts.mask.shape == env.mask_shape == () and ts.mask.dtype == bool and ts.mask
    assert env.state_layout == {"position": 3, "velocity": 2}
    assert ts.reward == 0.0 and not ts.done and ts.info["discount"] == 1.0
    ts = env.step(np.array([0.3]))
    assert isinstance(ts.reward, float) and 0.0 <= ts.reward <= 8.0
    assert ts.info["action"].tolist() == [0.3]
    assert math.isclose(env.control_timestep, 0.08)


def test_pixels_and_both_shapes():
    env = envs.make(TASK, obs="both", seed=0, action_repeat=2)
    ts = env.reset()
    assert list(ts.obs) == ["image", "state"] and ts.mask.tolist() == [True, True]
    image = ts.obs["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 5  # a rendered scene, not a blank frame
    np.testing.assert_array_equal(image, env.render())
    assert env.observation_shape == {"image": (64, 64, 3), "state": (5,)}
    assert envs.make(TASK, obs="pixels", size=32).observation_shape == (32, 32, 3)


def test_seeding_is_per_instance_and_reproducible():
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 1))
    a = run(envs.make(TASK, obs="states", seed=3), actions)
    b = run(envs.make(TASK, obs="states", seed=3), actions)
    c = run(envs.make(TASK, obs="states", seed=4), actions)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.obs, y.obs)
        assert x.reward == y.reward
    assert not np.array_equal(a[0].obs, c[0].obs)
    # a seed drawn when none is given is kept
    env = envs.make(TASK, obs="states")
    again = envs.make(TASK, obs="states", seed=env.seed)
    np.testing.assert_array_equal(env.reset().obs, again.reset().obs)


@pytest.mark.parametrize("repeat", [3, None])
def test_action_repeat_sums_rewards_like_a_naive_loop(repeat):
    env = envs.make(TASK, obs="states", seed=7, action_repeat=repeat)
    R = 8 if repeat is None else repeat
    raw = raw_env(7)
    actions = np.random.default_rng(1).uniform(-1, 1, (5, 1))
    ours = run(env, actions)
    ts = raw.reset()
    np.testing.assert_array_equal(ours[0].obs, flat(ts.observation))
    for a, step in zip(actions, ours[1:], strict=True):
        total = 0.0
        for _ in range(R):
            ts = raw.step(a)
            total += ts.reward
        assert step.reward == pytest.approx(total, abs=1e-12)
        np.testing.assert_array_equal(step.obs, flat(ts.observation))


def test_episode_end_statistics_and_partial_last_repeat():
    # 1000 simulator steps at repeat 300: 4 agent steps, the last one only 100 simulator steps
    env = envs.make(TASK, obs="states", seed=2, action_repeat=300)
    raw = raw_env(2)
    raw.reset()
    assert env.episode_length == 4
    ts = env.reset()
    rewards = []
    while not ts.done:
        ts = env.step([0.5])
        rewards.append(ts.reward)
    naive = [sum(raw.step([0.5]).reward for _ in range(n)) for n in (300, 300, 300, 100)]
    np.testing.assert_allclose(rewards, naive, atol=1e-12)
    stats = ts.info["episode"]
    assert stats == env.last_episode and stats.length == 4
    assert stats.episode_return == pytest.approx(sum(rewards))
    with pytest.raises(ValueError, match="reset"):
        env.step([0.0])
    assert env.reset().reward == 0.0  # a new episode starts cleanly


def test_bad_actions_raise_and_out_of_bounds_clip():
    env = envs.make(TASK, obs="states", seed=0)
    env.reset()
    for bad, match in [([np.nan], "non-finite"), ([np.inf], "non-finite"), ([0.1, 0.2], "shape")]:
        with pytest.raises(ValueError, match=match):
            env.step(bad)
    with pytest.raises(ValueError, match="numeric"):
        env.step(["left"])
    assert env.step(np.array([3.0])).info["action"].tolist() == [1.0]
    assert env.step(0.25).info["action"].tolist() == [0.25]  # scalar for 1-d actions
    strict = envs.make(TASK, obs="states", seed=0, clip_actions=False)
    strict.reset()
    with pytest.raises(ValueError, match="outside"):
        strict.step([1.5])


def test_unknown_task_obs_and_variant_raise():
    assert envs.parse_task("cup-catch") == ("ball_in_cup", "catch")
    assert envs.parse_task("ball_in_cup_catch") == ("ball_in_cup", "catch")
    assert envs.parse_task("cartpole_balance_sparse") == ("cartpole", "balance_sparse")
    with pytest.raises(ValueError, match="unknown dm_control task"):
        envs.parse_task("cartpole-fly")
    with pytest.raises(ValueError, match="obs"):
        envs.make(TASK, obs="sound")
    with pytest.raises(ValueError, match="variant"):
        envs.make(TASK, variant="hard")
    with pytest.raises(ValueError, match="transition_noise"):
        envs.as_variant({"transition_noise": -1.0})
    with pytest.raises(ValueError, match="fusion"):
        envs.make(TASK, obs="states", variant="fusion")
    with pytest.raises(ValueError, match="observation noise"):
        envs.make(TASK, obs="pixels", variant="noisy")
    with pytest.raises(ValueError, match="occlusion"):
        envs.make(TASK, obs="states", variant="occlusion")
    assert envs.as_variant("noisy") == Variant(0.3, 0.3)
    assert envs.as_variant({"occlusion": True}).occlusion == Occlusion()


def test_transition_noise_only_changes_executed_actions():
    actions = np.random.default_rng(2).uniform(-0.5, 0.5, (60, 1))

    def base():
        return envs.make(TASK, obs="states", seed=5, action_repeat=1)

    plain = run(base(), actions)
    zero = run(TransitionNoise(base(), 0.0, seed=5), actions)
    for x, y in zip(plain, zero, strict=True):
        np.testing.assert_array_equal(x.obs, y.obs)
        assert x.reward == y.reward
    noisy_env = envs.make(
        TASK, obs="states", seed=5, action_repeat=1, variant={"transition_noise": 0.3}
    )
    noisy = run(noisy_env, actions)
    executed = np.stack([s.info["action"] for s in noisy[1:]])
    agent = np.stack([s.info["agent_action"] for s in noisy[1:]])
    np.testing.assert_array_equal(agent, actions)
    assert np.all(np.abs(executed) <= 1.0)
    inside = np.abs(executed) < 1.0
    assert 0.2 < np.std(executed[inside] - actions[inside]) < 0.4  # sigma = 0.3
    assert not np.array_equal(noisy[-1].obs, plain[-1].obs)
    # the noise acts only through the executed actions: replaying them reproduces everything
    replay = run(base(), executed)
    for x, y in zip(noisy, replay, strict=True):
        np.testing.assert_array_equal(x.obs, y.obs)
        assert x.reward == y.reward


def test_observation_noise_only_changes_float_observations():
    actions = np.random.default_rng(3).uniform(-1, 1, (40, 1))

    def base():
        return envs.make(TASK, obs="states", seed=6, action_repeat=1)

    clean_env, noisy_env = base(), ObservationNoise(base(), 0.3, seed=6)
    clean, noisy = run(clean_env, actions), run(noisy_env, actions)
    diff = np.stack([n.obs - c.obs for n, c in zip(noisy, clean, strict=True)])
    assert diff.dtype == np.float32
    assert abs(diff.mean()) < 0.06 and 0.25 < diff.std() < 0.35
    assert [n.reward for n in noisy] == [c.reward for c in clean]
    np.testing.assert_array_equal(noisy_env.physics_state(), clean_env.physics_state())
    # images are untouched (equal to a fresh render of the same state), the state is noisy
    both = envs.make(TASK, obs="both", seed=6, variant={"observation_noise": 0.3})
    for i in range(3):
        ts = both.reset() if i == 0 else both.step(actions[i])
        np.testing.assert_array_equal(ts.obs["image"], both.render())
        x, theta, dx, dtheta = both.physics_state()
        truth = np.array([x, np.cos(theta), np.sin(theta), dx, dtheta], np.float32)
        assert 0.0 < np.abs(ts.obs["state"] - truth).max() < 2.0


def test_occlusion_mask_marks_exactly_the_changed_pixels():
    occ = Occlusion(num_discs=3, radius=(0.15, 0.25), speed=(0.02, 0.03))
    env = envs.make(TASK, obs="pixels", seed=9, variant={"occlusion": occ})
    actions = [[0.5], [-0.5], [1.0]]
    steps, clean, centers = [env.reset()], [env.unwrapped.render()], [env._center.copy()]
    for a in actions:
        steps.append(env.step(a))
        clean.append(env.unwrapped.render())
        centers.append(env._center.copy())
    for s, c in zip(steps, clean, strict=True):
        visible = s.info["pixel_mask"]
        assert visible.shape == (64, 64) and visible.dtype == bool
        assert 0.02 < 1 - visible.mean() < 0.9
        np.testing.assert_array_equal(s.info["clean_image"], c)
        changed = np.any(s.obs != c, axis=-1)
        assert not np.any(changed & visible)  # nothing visible changed
        assert (changed == ~visible).mean() > 0.99  # occluded pixels differ (up to equal colours)
    moves = np.linalg.norm(np.diff(np.stack(centers), axis=0), axis=-1)
    assert np.all(moves <= 0.03 * 64 + 1e-9) and np.all(moves > 0)  # slow, but moving
    # the discs are deterministic given the seed (independent of the scene below them)
    again = envs.Occluded(env.unwrapped, occ, seed=9)
    masks = [s.info["pixel_mask"] for s in run(again, actions)]
    for s, m in zip(steps, masks, strict=True):
        np.testing.assert_array_equal(s.info["pixel_mask"], m)
    # a new episode draws new discs
    assert not np.array_equal(again.reset().info["pixel_mask"], masks[0])


def test_sensor_fusion_images_every_4_to_8_steps():
    env = envs.make(TASK, obs="pixels", seed=11, action_repeat=2, variant="fusion")
    ts = env.reset()
    assert list(ts.obs) == ["image", "proprio"] and ts.mask.tolist() == [True, True]
    flags, steps = [True], [ts]
    for _ in range(40):
        ts = env.step([0.2])
        flags.append(bool(ts.mask[0]))
        steps.append(ts)
        assert ts.mask[1]
        # proprio: the cart position, every step
        assert ts.obs["proprio"].shape == (1,)
        assert ts.obs["proprio"][0] == np.float32(env.physics_state()[0])
        assert (ts.obs["image"].max() > 0) == ts.mask[0]  # absent images are zeros
    gaps = np.diff(np.flatnonzero(flags))
    assert len(gaps) >= 4 and np.all((gaps >= 4) & (gaps <= 8)) and len(set(gaps)) > 1
    assert np.flatnonzero(flags)[-1] > 40 - 8  # no gap longer than 8 at the end either
    per_episode = envs.SensorFusion(env.unwrapped, Fusion(4, 8, per_episode=True), seed=11)
    per_episode.reset()
    flags = [True] + [bool(per_episode.step([0.0]).mask[0]) for _ in range(20)]
    assert len(set(np.diff(np.flatnonzero(flags)))) == 1
