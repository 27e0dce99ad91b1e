"""The RSSM on images and with MC dropout: uint8 preprocessing and the masked per-pixel Gaussian
likelihood of the conv decoder, the conv-encoder filtering guide (masked images unseen), the
world model's belief step walking the guide's path on image + proprio observations with a masked
image; MC dropout placed after the hidden layers (against a hand-written reference), shared by
model and guide (one site, zero ELBO term), off at rate 0, and in ``imagine`` a function of the
key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO
from scipy import stats

from inference.guides import filtering
from pssm.rssm import rssm
from rl.world_models.rssm import RSSMBelief, rssm_parts, rssm_world_model

U, S, H = 2, 3, 5
DIMS = {"image": (64, 64, 3), "proprio": 2}
SIZES = dict(stoch=S, deter=H, hidden=8, conv_depth=2)


def params_of(*traces):
    return {k: v["value"] for tr in traces for k, v in tr.items() if v["type"] == "param"}


def _batch(B=1, T=3):
    rng = np.random.default_rng(0)
    mask = np.ones((B, T, 2), bool)
    mask[0, 1, 0] = False  # the image of step 1 is missing (sensor fusion: proprio only)
    return {
        "obs": {
            "image": rng.integers(0, 256, size=(B, T, 64, 64, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(B, T, 2)),
        },
        "actions": rng.uniform(-1, 1, size=(B, T, U)),
        "rewards": rng.normal(size=(B, T)),
        "mask": mask,
    }


def test_images_model_guide_and_world_model_step_together():
    batch = _batch()
    model, guide, _, _ = rssm_parts(DIMS, U, **SIZES)
    with handlers.seed(rng_seed=1):
        g = handlers.trace(guide).get_trace(**batch)
    assert {"filter_net_encoder_image$params", "filter_net$params"} <= set(g)
    m = handlers.trace(handlers.replay(handlers.seed(model, 2), g)).get_trace(**batch)
    params = params_of(g, m)
    # uint8 -> 5-bit floats in [-0.5, 0.5], zero where missing; unit-variance Gaussian per pixel
    image = np.floor(batch["obs"]["image"] / 8.0) / 32.0 - 0.5
    image[0, 1] = 0.0
    site = m["obs_image"]
    np.testing.assert_array_equal(site["value"], image)
    z_path = np.concatenate([g["z_0"]["value"][:, None], np.moveaxis(g["z"]["value"], 0, 1)], 1)
    with handlers.substitute(data=params):
        mean = model.decoders()["image"](np.concatenate([m["h"]["value"], z_path], -1))
    assert mean.shape == (1, 3, 64, 64, 3)
    expected = stats.norm.logpdf(image, mean, 1.0).sum((-1, -2, -3)) * batch["mask"][..., 0]
    np.testing.assert_allclose(site["fn"].log_prob(site["value"]), expected.sum(-1), rtol=1e-10)
    # the guide does not see a masked image: other pixels there, same samples
    other = dict(batch, obs=dict(batch["obs"], image=batch["obs"]["image"].copy()))
    other["obs"]["image"][0, 1] = 255 - other["obs"]["image"][0, 1]
    with handlers.seed(rng_seed=1):
        z_other = handlers.substitute(guide, params)(**other)
    np.testing.assert_array_equal(z_other, z_path)

    # the world model steps as the guide (observe) and the model's prior (imagine)
    wm = rssm_world_model(DIMS, U, **SIZES)
    belief = wm.init_belief(params, 1)
    for t in range(3):
        k = jax.random.key(10 + t)
        if t > 0:
            imagined = wm.imagine(params, k, belief, jnp.asarray(batch["actions"][:, t - 1]))
            fn = m["z"]["fn"].base_dist
            eps = jax.random.normal(k, (1, S))
            np.testing.assert_allclose(imagined.z, fn.loc[t - 1] + fn.scale[t - 1] * eps, rtol=1e-9)
            belief = imagined
        obs_t = jax.tree.map(lambda v, t=t: jnp.asarray(v[:, t]), batch["obs"])
        observed = wm.observe(params, k, belief, obs_t, jnp.asarray(batch["mask"][:, t]))
        fn = (g["z_0"] if t == 0 else g["z"])["fn"].base_dist
        loc, scale = (fn.loc, fn.scale) if t == 0 else (fn.loc[t - 1], fn.scale[t - 1])
        eps = jax.random.normal(k, (1, S))
        np.testing.assert_allclose(observed.z, loc + scale * eps, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(observed.h, m["h"]["value"][:, t], rtol=1e-9, atol=1e-12)
        belief = RSSMBelief(observed.h, jnp.asarray(z_path[:, t]), observed.first)
    # the training objective initialises on uint8 image batches (SVI.init traces both programs)
    raw, _ = wm.objective.init(jax.random.key(0), batch)
    assert set(raw) >= {"filter_net_encoder_image$params", "rssm_decoder_image$params"}


def test_image_only_observations_as_an_array():
    """``obs_dims=(64, 64, 3)``: one image array, sites ``"obs"``; a float image is taken as
    already preprocessed (no second mapping)."""
    model = rssm((64, 64, 3), 0, **SIZES)
    x = np.random.default_rng(1).uniform(-0.5, 0.5, size=(1, 2, 64, 64, 3))
    tr = handlers.trace(handlers.seed(model, 0)).get_trace(x)
    np.testing.assert_array_equal(tr["obs"]["value"], x)
    assert tr["obs"]["fn"].event_shape == (2, 64, 64, 3) and tr["h"]["value"].shape == (1, 2, H)
    with pytest.raises(ValueError, match="RSSM takes"):
        rssm((8, 8), 0, **SIZES)


# --- MC dropout ---------------------------------------------------------------------------------

P, B, T, RATE = 4, 3, 5, 0.4  # the sizes of tests/test_rl_rssm.py


def _vector_data():
    k = jax.random.split(jax.random.key(3), 2)
    return jax.random.normal(k[0], (B, T, P)), jax.random.normal(k[1], (B, T, U))


def test_dropout_placement_against_hand_written_reference():
    """Condition the dropout noise and z: "h" and the prior factors equal the GRU / MLP
    equations with inverted dropout after the hidden layers written out by hand."""
    model = rssm(P, U, stoch=S, deter=H, hidden=8, mc_dropout=RATE)
    obs, actions = _vector_data()
    k = jax.random.split(jax.random.key(4), 2)
    noise = jax.random.uniform(k[0], (B, T, 16))
    z = jax.random.normal(k[1], (B, T, S))
    cond = {"z_0": z[:, 0], "z": jnp.moveaxis(z[:, 1:], 1, 0), "rssm_dropout": noise}
    tr = handlers.trace(handlers.seed(handlers.condition(model, cond), 0)).get_trace(obs, actions)
    p = params_of(tr)
    dense = lambda q, x: x @ q["kernel"] + (q["bias"] if "bias" in q else 0.0)
    drop = lambda x, u: np.where(u >= RATE, x / (1 - RATE), 0.0)

    def gru(q, h, x):
        xr, xu, xn = np.split(dense(q["dense_i"], x), 3, axis=-1)
        hr, hu, hn = np.split(dense(q["dense_h"], h), 3, axis=-1)
        r, u = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xu + hu)
        return (1 - u) * np.tanh(xn + r * hn) + u * h

    det, prior = p["rssm_deterministic$params"], p["rssm_prior$params"]
    h = [np.zeros((B, H))]
    for t in range(1, T):
        x = jax.nn.elu(
            dense(det["inputs"]["layer0"], np.concatenate([z[:, t - 1], actions[:, t - 1]], -1))
        )
        h.append(gru(det["gru"]["cell"], h[-1], drop(x, noise[:, t, :8])))
    h = np.stack(h, 1)
    np.testing.assert_allclose(tr["h"]["value"], h, rtol=1e-10, atol=1e-12)
    hid = drop(jax.nn.elu(dense(prior["trunk"]["layer0"], h)), noise[..., 8:])
    mean = dense(prior["head"]["mean"], hid)
    np.testing.assert_allclose(tr["z_0"]["fn"].base_dist.loc, mean[:, 0], rtol=1e-10)
    np.testing.assert_allclose(
        tr["z"]["fn"].base_dist.loc, np.moveaxis(mean[:, 1:], 1, 0), rtol=1e-10
    )


def test_dropout_shared_by_guide_and_model_and_off_at_rate_zero():
    obs, actions = _vector_data()
    model = rssm(P, U, stoch=S, deter=H, hidden=8, mc_dropout=RATE)
    guide = filtering(model, hidden=8)
    g = handlers.trace(handlers.seed(guide, 1)).get_trace(obs, actions)
    m = handlers.trace(handlers.replay(handlers.seed(model, 2), g)).get_trace(obs, actions)
    assert g["rssm_dropout"]["value"].shape == (B, T, 16)
    np.testing.assert_array_equal(m["rssm_dropout"]["value"], g["rssm_dropout"]["value"])
    # the guide's h (one step recomputed by hand from its samples and masks) is the model's h
    params = params_of(g, m)
    with handlers.substitute(data=params):
        h1 = model.deterministic()(
            jnp.zeros((B, H)), g["z_0"]["value"], actions[:, 0],
            noise=g["rssm_dropout"]["value"][:, 1, :8],
        )  # fmt: skip
    np.testing.assert_allclose(m["h"]["value"][:, 1], h1, rtol=1e-12)
    terms = TraceMeanField_ELBO(sum_sites=False).loss(
        jax.random.key(0), params, model, guide, obs, actions
    )
    assert float(terms["rssm_dropout"]) == 0.0 and np.isfinite(float(terms["z"]))
    # rate 0: no dropout site (the model is the plain RSSM; tests/test_rl_rssm.py, test_rssm.py)
    with handlers.seed(rng_seed=0):
        assert rssm(P, U, stoch=S, deter=H, hidden=8).dropout_noise(B, T) is None
        assert model.dropout_noise(B, T).path.shape == (B, T, 8)


def test_imagine_dropout_is_a_function_of_the_key():
    """PlaNet candidates imagine with keys of their own: with dropout, other keys give other
    deterministic states, the same key the same; at rate 0 the deterministic path ignores the
    key. (``params={}``: the initial weights.)"""
    belief = RSSMBelief(jnp.full((B, H), 0.3), jnp.ones((B, S)), jnp.zeros((B,), bool))
    a = jnp.full((B, U), 0.5)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    for rate in (0.0, RATE):
        wm = rssm_world_model(P, U, stoch=S, deter=H, hidden=8, mc_dropout=rate)
        one, again, other = (wm.imagine({}, k, belief, a) for k in (k1, k1, k2))
        np.testing.assert_array_equal(one.h, again.h)
        np.testing.assert_array_equal(one.z, again.z)
        if rate == 0.0:
            np.testing.assert_array_equal(one.h, other.h)  # no dropout: h ignores the key
        else:
            assert np.abs(one.h - other.h).max() > 1e-3  # other masks, other dynamics
