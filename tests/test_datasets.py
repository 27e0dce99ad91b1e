"""rl.datasets: a tiny recorded data set, its cache, metadata and ground truth."""

import numpy as np
import pytest

from rl import datasets, envs
from rl.datasets import DatasetConfig

TASK = "cartpole-swingup"


def test_tiny_dataset_roundtrip_metadata_and_ground_truth(tmp_path):
    variant = {"occlusion": True, "fusion": True, "transition_noise": 0.2}
    config = DatasetConfig(TASK, num_sequences=2, length=10, variant=variant, seed=1)
    ds = datasets.generate(config, cache_dir=tmp_path)
    assert not ds.from_cache and ds.path.parent == tmp_path / TASK
    d = ds.data
    N, T = 2, 10
    assert d["image"].shape == (N, T, 64, 64, 3) and d["image"].dtype == np.uint8
    assert d["state"].shape == (N, T, 5) and d["proprio"].shape == (N, T, 1)
    assert d["mask"].shape == (N, T, 3) and d["mask"].dtype == bool
    assert d["pixel_mask"].shape == (N, T, 64, 64)
    assert d["actions"].shape == d["applied_actions"].shape == (N, T, 1)
    assert d["rewards"].shape == d["discounts"].shape == (N, T)
    assert d["physics_state"].shape == (N, T, 4) and d["physics_state"].dtype == np.float64
    # fusion: images at t = 0 and every 4..8 steps, zeros in between; the rest every step
    image_flag = d["mask"][..., 0]
    assert image_flag[:, 0].all() and (~image_flag).any()
    for n in range(N):
        gaps = np.diff(np.flatnonzero(image_flag[n]))
        assert np.all((gaps >= 4) & (gaps <= 8))
    assert np.all(d["image"][~image_flag] == 0)
    present = d["image"][image_flag]
    assert np.all(present.reshape(len(present), -1).std(-1) > 5)  # rendered scenes
    assert 0.0 < 1 - d["pixel_mask"][image_flag].mean() < 0.9  # partly occluded
    assert d["mask"][..., 1:].all()
    # transition noise moved the executed actions off the agent's, within bounds
    assert not np.allclose(d["applied_actions"], d["actions"])
    assert np.abs(d["applied_actions"]).max() <= 1.0 and np.abs(d["actions"]).max() <= 1.0
    # ground truth agrees with the (noise-free) state observation: [x, cos, sin, dx, dtheta]
    x, theta, dx, dtheta = np.moveaxis(d["physics_state"], -1, 0)
    truth = np.stack([x, np.cos(theta), np.sin(theta), dx, dtheta], -1)
    np.testing.assert_allclose(d["state"], truth, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d["proprio"][..., 0], x, rtol=1e-6, atol=1e-6)
    # metadata is complete
    meta = ds.metadata
    assert meta["config"]["task"] == TASK and meta["config"]["action_repeat"] == 8
    assert meta["config"]["variant"]["fusion"] == {"min_gap": 4, "max_gap": 8, "per_episode": False}
    assert meta["modalities"] == ["image", "state", "proprio"]
    assert meta["state_layout"] == {"position": 3, "velocity": 2}
    assert meta["episode_length"] == 125 and meta["physics_state_size"] == 4
    assert set(meta["arrays"]) == set(d) and meta["versions"]["mujoco"]
    assert ds.path.name == f"{meta['key']}.npz"
    # reloading gives the same arrays; a second generate call loads instead of recording
    again = datasets.generate(config, cache_dir=tmp_path)
    assert again.from_cache and again.metadata == meta
    for k in d:
        np.testing.assert_array_equal(again.data[k], d[k])
    assert sorted(p.name for p in ds.path.parent.iterdir()) == sorted(
        [ds.path.name, ds.path.with_suffix(".json").name]
    )


def test_states_only_dataset_is_reproducible_and_keyed_by_config(tmp_path):
    config = DatasetConfig(TASK, num_sequences=2, length=10, images=False, seed=3)
    a = datasets.generate(config, cache_dir=tmp_path, name="tiny")
    b = datasets.generate(config, cache_dir=tmp_path, name="tiny", overwrite=True)
    assert not b.from_cache and a.path == b.path
    assert "image" not in a.data and a.data["mask"].shape == (2, 10, 2)
    for k in a.data:
        np.testing.assert_array_equal(a.data[k], b.data[k])
    other = datasets.generate(config._replace(seed=4), cache_dir=tmp_path, name="tiny")
    assert other.path != a.path and not np.array_equal(other.data["state"], a.data["state"])
    # the two sequences are different episodes; random actions are uniform in the bounds
    assert not np.array_equal(a.data["state"][0, 0], a.data["state"][1, 0])
    np.testing.assert_array_equal(a.data["actions"], a.data["applied_actions"])
    # the rewards match a replay of the recorded actions on a fresh environment
    env = envs.make(TASK, obs="states", seed=3)
    for n in range(2):
        ts = env.reset()
        np.testing.assert_array_equal(ts.obs, a.data["state"][n, 0])
        rewards = [env.step(act).reward for act in a.data["actions"][n]]
        np.testing.assert_allclose(a.data["rewards"][n], rewards, rtol=1e-6)


def test_given_actions_and_policies(tmp_path):
    config = DatasetConfig(TASK, num_sequences=1, length=5, images=False, seed=0)
    actions = np.linspace(-1, 1, 5).reshape(1, 5, 1)
    ds = datasets.generate(config, actions=actions, cache_dir=tmp_path)
    np.testing.assert_allclose(ds.data["actions"], actions)
    calls = []

    def policy(ts, rng):
        calls.append(ts.obs["state"].shape)
        return np.array([0.5])

    with pytest.raises(ValueError, match="policy_id"):
        datasets.generate(config, policy=policy, cache_dir=tmp_path)
    by_policy = datasets.generate(config, policy=policy, policy_id="half", cache_dir=tmp_path)
    assert calls == [(5,)] * 5 and np.all(by_policy.data["actions"] == 0.5)
    assert by_policy.path != ds.path
    with pytest.raises(ValueError, match="shape"):
        datasets.generate(config, actions=np.zeros((1, 4, 1)), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="episode length"):
        datasets.generate(config._replace(length=126), cache_dir=tmp_path)
