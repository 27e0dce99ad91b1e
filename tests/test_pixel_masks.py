"""Per-pixel likelihood masks (VRKN, Becker & Neumann 2022, Sec. 4.2: on the occlusion tasks only
the visible pixels enter the reconstruction loss) and the reward-only baseline (Fig. 6: no
reconstruction term): the masked Gaussian log-likelihood against a hand-written sum over the
visible pixels, blind to the occluded pixels' values in value and gradient; the masks of an
occluded environment through replay into a world model's loss; a model without reconstruction
scoring its latent path and rewards only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy import stats

from pssm.inputs import gaussian_observations, observation_sites, prepare_inputs

DIMS = {"image": (3, 4, 2), "proprio": 2}
VAR = 0.7


def _data(seed, B=2, T=3):
    rng = np.random.default_rng(seed)
    obs = {"image": rng.normal(size=(B, T, 3, 4, 2)), "proprio": rng.normal(size=(B, T, 2))}
    means = {k: rng.normal(size=v.shape) for k, v in obs.items()}
    mask = rng.random((B, T, 2)) < 0.8  # whole modalities missing at some steps
    pixels = rng.random((B, T, 3, 4)) < 0.6  # visible pixels
    return obs, means, mask, pixels


def log_likelihood(means, obs, mask, pixel_mask):
    """The log-likelihood ``gaussian_observations`` scores (sum over its sites)."""
    x = prepare_inputs(DIMS, 0, obs, None, mask)
    with handlers.trace() as tr:
        gaussian_observations(x, means, observation_sites(DIMS), prefix="m", obs_var=VAR,
                              pixel_mask=pixel_mask)  # fmt: skip
    return sum(jnp.sum(s["fn"].log_prob(s["value"])) for s in tr.values() if s["type"] == "sample")


def hand_written(means, obs, mask, pixels):
    """``sum_{b, t} [m_btk] sum_{visible i} log N(o_i; mu_i, VAR)`` over the modalities."""
    total = 0.0
    for k, name in enumerate(DIMS):
        lp = stats.norm.logpdf(obs[name], means[name], np.sqrt(VAR))
        for b, t in np.ndindex(*mask.shape[:2]):
            if not mask[b, t, k]:
                continue
            if name == "image":
                total += lp[b, t][pixels[b, t]].sum()  # (visible pixels, channels)
            else:
                total += lp[b, t].sum()
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_log_likelihood_is_the_sum_over_visible_pixels(seed):
    obs, means, mask, pixels = _data(seed)
    masked = log_likelihood(means, obs, mask, {"image": pixels})
    np.testing.assert_allclose(masked, hand_written(means, obs, mask, pixels), rtol=1e-5)
    every = log_likelihood(means, obs, mask, None)
    full = hand_written(means, obs, mask, np.ones_like(pixels))
    np.testing.assert_allclose(every, full, rtol=1e-5)
    assert abs(float(every - masked)) > 1.0  # the occluded pixels did count before
    # a per-channel mask (B, T, H, W, C) equal across channels is the per-pixel one
    per_channel = np.repeat(pixels[..., None], 2, -1)
    np.testing.assert_allclose(log_likelihood(means, obs, mask, {"image": per_channel}), masked,
                               rtol=1e-6)  # fmt: skip


def test_occluded_pixels_change_neither_the_loss_nor_its_gradient():
    obs, means, mask, pixels = _data(3)
    garbage = {**obs, "image": obs["image"].copy()}
    noise = np.random.default_rng(4).normal(size=((~pixels).sum(), 2))
    garbage["image"][~pixels] = 1e3 * noise
    pm = {"image": pixels}

    def loss(m, o):
        return -log_likelihood(m, o, mask, pm)

    value, grad = jax.value_and_grad(loss)(means, obs)
    value2, grad2 = jax.value_and_grad(loss)(means, garbage)
    assert float(value) == float(value2) and np.isfinite(float(value))
    for k in DIMS:
        np.testing.assert_array_equal(grad[k], grad2[k])
    # the gradient is exactly zero at occluded pixels, and the Gaussian's elsewhere
    g = np.asarray(grad["image"])
    assert np.all(g[~pixels] == 0.0)
    seen = pixels[..., None] & mask[..., 0, None, None, None]
    expected = np.where(seen, -(obs["image"] - means["image"]) / VAR, 0.0)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def test_bad_pixel_masks_raise():
    obs, means, mask, pixels = _data(5)
    with pytest.raises(ValueError, match="shape"):
        log_likelihood(means, obs, mask, {"image": pixels[..., :3]})
    with pytest.raises(ValueError, match="0/1"):
        log_likelihood(means, obs, mask, {"image": pixels * 2.0})
    with pytest.raises(ValueError, match="names"):
        log_likelihood(means, obs, mask, {"depth": pixels})
    with pytest.raises(ValueError, match="named modalities"):
        log_likelihood(means, obs, mask, pixels)


class Recording:
    """An environment that keeps the ``info["pixel_mask"]`` of every time step it returns."""

    def __init__(self, env):
        self.env, self.masks = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def _keep(self, ts):
        self.masks.append(ts.info["pixel_mask"].copy())
        return ts

    def reset(self):
        return self._keep(self.env.reset())

    def step(self, action, **kwargs):
        return self._keep(self.env.step(action, **kwargs))


def _world_model(family):
    from rl.world_models.kalmamba import kalmamba_parts
    from rl.world_models.rssm import rssm_parts
    from rl.world_models.vrkn import vrkn_parts

    image, u = (64, 64, 3), 1
    if family == "rssm":
        return rssm_parts(image, u, stoch=3, deter=5, hidden=8, conv_depth=2)
    if family == "vrkn":
        return vrkn_parts(image, u, latent_dim=4, hidden=8, mlp_hidden=(8,), conv_depth=2)
    return kalmamba_parts(image, u, latent_dim=4, hidden=(8,), d_model=8, d_state=4,
                          conv_depth=2)  # fmt: skip


@pytest.mark.parametrize("family", ["rssm", *(pytest.param(f, marks=pytest.mark.slow)
                                     for f in ("vrkn", "kalmamba"))])  # fmt: skip
def test_occluded_episodes_masks_reach_the_world_models_loss(family):
    """Occlusion variant -> runner's episode -> replay -> batch -> loss: the pixel masks the
    environment gave are the ones replay hands on, and each pixel's term enters the loss once,
    added, where visible: ``L(M) + L(~M) = L(all) + L(none)``, ``L(all) = L(no mask)``."""
    from rl import envs
    from rl.replay import Replay
    from rl.runner import play_episode, random_policy
    from rl.world_model import from_parts

    env = Recording(envs.make("cartpole-swingup", obs="pixels", seed=3, variant="occlusion"))
    replay = Replay(capacity=1000, seed=0)
    play_episode(env, random_policy(1, 0), replay=replay)
    np.testing.assert_array_equal(replay.episode(0)["pixel_mask"], np.stack(env.masks))
    batch = replay.sample_sequences(2, 3).model_batch(np.float32)
    visible = batch.pop("pixel_mask")
    assert 0.02 < 1 - visible.mean() < 0.9  # some pixels occluded, most not

    objective = from_parts(_world_model(family)).objective
    key = jax.random.key(0)
    params, aux = objective.init(key, batch)
    loss = jax.jit(lambda b: objective.loss(params, aux, key, b)[0])
    none, every = loss(batch), loss({**batch, "pixel_mask": np.ones_like(visible)})
    seen, hidden, blind = (loss({**batch, "pixel_mask": m})
                           for m in (visible, ~visible, np.zeros_like(visible)))  # fmt: skip
    scale = abs(float(none))
    np.testing.assert_allclose(every, none, rtol=1e-6)
    np.testing.assert_allclose(seen + hidden, every + blind, rtol=0, atol=1e-5 * scale)
    assert abs(float(seen - none)) > 1.0 and abs(float(blind - none)) > 1.0


def _settings(**changes):
    from rl.presets import PRESETS

    small = dict(latent=4, model_hidden=8, stoch=3, deter=5, d_model=8, d_state=4)
    return {**PRESETS["cpu"]["*"], **small, **changes}


@pytest.mark.parametrize("family", ["rssm", pytest.param("vrkn", marks=pytest.mark.slow)])
def test_reward_only_model_scores_latents_and_rewards_but_no_observation(family):
    """``reconstruction=false`` (the reward-only baseline of VRKN's Fig. 6): its loss is the
    full model's with every observation entry masked out, so the observations' values reach
    it only through the guide; the decoder gets no gradient; the rewards still count."""
    from rl import models
    from rl.world_model import from_parts

    rng = np.random.default_rng(0)
    B, T, p = 2, 4, 3
    batch = {"obs": rng.normal(size=(B, T, p)).astype(np.float32),
             "actions": rng.uniform(-1, 1, (B, T, 1)).astype(np.float32),
             "rewards": rng.normal(size=(B, T)).astype(np.float32),
             "mask": np.ones((B, T), bool)}  # fmt: skip
    reward_only = models.parts(family, p, 1, _settings(reconstruction=False))
    full = models.parts(family, p, 1, _settings())
    with handlers.seed(rng_seed=0), handlers.trace() as tr:
        reward_only.model(**batch)
    assert "obs" not in tr and "reward" in tr  # the observation site is hidden
    key = jax.random.key(1)
    obj_ro, obj_full = from_parts(reward_only).objective, from_parts(full).objective
    params, aux = jax.jit(obj_ro.init)(key, batch)
    shapes = jax.eval_shape(obj_full.init, key, batch)[0]  # (also readies obj_full.constrain)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)  # same networks

    def value_and_grad(objective):
        return jax.jit(jax.value_and_grad(lambda prm, b: objective.loss(prm, aux, key, b)[0]))

    vg_ro, vg_full = value_and_grad(obj_ro), value_and_grad(obj_full)
    value, grads = vg_ro(params, batch)
    every_seen = {**batch, "pixel_mask": np.ones((B, T, p), bool)}
    value_full, grads_full = vg_full(params, every_seen)
    none_seen = {**batch, "pixel_mask": np.zeros((B, T, p), bool)}
    np.testing.assert_allclose(value, vg_full(params, none_seen)[0], rtol=1e-6)
    assert abs(float(value_full - value)) > 1.0
    # no gradient reaches the decoder (the full model's does); the rewards still count
    decoder = [k for k in grads if "decoder" in k]
    assert decoder and not any(jnp.any(g) for k in decoder for g in jax.tree.leaves(grads[k]))
    assert all(any(jnp.any(g) for g in jax.tree.leaves(grads_full[k])) for k in decoder)
    shifted = {**batch, "rewards": batch["rewards"] + 1.0}
    assert abs(float(vg_ro(params, shifted)[0] - value)) > 1e-3


def test_reconstruction_is_a_checked_setting():
    from rl.presets import check_overrides

    check_overrides([("reconstruction", False)])
    with pytest.raises(ValueError, match="reconstruction"):
        check_overrides([("reconstruction", "none")])
