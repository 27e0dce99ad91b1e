"""MC dropout, image scaling and the conv encoder/decoder of pssm.layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pssm.layers import (
    ConvDecoder,
    ConvEncoder,
    FlatImageDecoder,
    FlatImageEncoder,
    MCDropout,
    postprocess_image,
    preprocess_image,
    upsample_nearest,
)


def test_mc_dropout_identity_without_key_or_rate():
    x = jnp.arange(1.0, 7.0)
    np.testing.assert_array_equal(MCDropout(0.3)(x), x)
    np.testing.assert_array_equal(MCDropout(0.0)(x, jax.random.key(0)), x)
    with pytest.raises(ValueError, match="rate"):
        MCDropout(1.0)


def test_mc_dropout_masks_keys_and_expectation():
    rate, n = 0.25, 200_000
    drop = MCDropout(rate)
    x = jnp.full((n,), 2.0)
    key0, key1 = jax.random.key(0), jax.random.key(1)
    y0, y0_again, y1 = drop(x, key0), drop(x, key0), drop(x, key1)
    np.testing.assert_array_equal(y0, y0_again)  # pure: same key, same mask
    assert not np.array_equal(y0, y1)
    # kept entries are scaled by 1/(1-rate), dropped ones are 0
    assert set(np.unique(np.asarray(y0)).round(12)) == {0.0, round(2.0 / (1 - rate), 12)}
    frac = float(jnp.mean(y0 == 0))
    se = np.sqrt(rate * (1 - rate) / n)
    assert abs(frac - rate) < 5 * se
    # inverted dropout preserves the expectation: E[y] = x (5 standard errors)
    sd = 2.0 * np.sqrt(rate / (1 - rate) / n)
    assert abs(float(jnp.mean(y1)) - 2.0) < 5 * sd
    # the key path is the noise path with u ~ U(0, 1) drawn from that key
    u = jax.random.uniform(jax.random.key(0), x.shape, x.dtype)
    np.testing.assert_array_equal(drop(x, noise=u), y0)


def test_image_scaling_conventions():
    pixels = np.arange(256, dtype=np.uint8)
    eight = preprocess_image(pixels, bits=8)
    np.testing.assert_allclose(eight, pixels / 256.0 - 0.5)
    five = preprocess_image(pixels, bits=5)
    np.testing.assert_allclose(five, np.floor(pixels / 8.0) / 32.0 - 0.5)
    assert float(five.min()) == -0.5 and float(five.max()) == 0.5 - 1 / 32
    np.testing.assert_array_equal(postprocess_image(five, bits=5), pixels // 8 * 8)
    np.testing.assert_array_equal(postprocess_image(eight), pixels)
    noisy = preprocess_image(pixels, bits=5, noise_key=jax.random.key(0))
    assert np.all((noisy >= five) & (noisy < five + 1 / 32))
    with pytest.raises(ValueError):
        preprocess_image(pixels, bits=9)


def test_upsample_nearest_matches_kron():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
    ref = np.stack([np.stack([np.kron(x[n, ..., c], np.ones((2, 2))) for c in range(5)], -1)
                    for n in range(2)])  # fmt: skip
    np.testing.assert_array_equal(upsample_nearest(jnp.asarray(x)), ref)


def test_conv_encoder_decoder_shapes_with_leading_axes():
    # the PlaNet/Dreamer sizes, built abstractly (no weights drawn): 2 x 2 x 256 features
    assert nnx.eval_shape(lambda: ConvEncoder((64, 64, 3), rngs=nnx.Rngs(0))).flat_features == 1024
    rngs = nnx.Rngs(0)  # small depths below (the sizes of the VRKN image test: shared compiles)
    enc = ConvEncoder((64, 64, 3), depth=2, rngs=rngs)
    assert enc.flat_features == 2 * 2 * 16
    images = jax.random.uniform(jax.random.key(0), (2, 3, 64, 64, 3)) - 0.5
    f = enc(images)
    assert f.shape == (2, 3, 64) and bool(jnp.all(jnp.isfinite(f)))
    # leading axes are pure batch axes: permuting them permutes the features alike
    np.testing.assert_allclose(enc(images.swapaxes(0, 1)), f.swapaxes(0, 1), rtol=1e-12)
    dec = ConvDecoder(4, (64, 64, 3), depth=2, rngs=rngs)
    z = jax.random.normal(jax.random.key(1), (2, 3, 4))
    out = dec(z)
    assert out.shape == (2, 3, 64, 64, 3) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(dec(z.swapaxes(0, 1)), out.swapaxes(0, 1), rtol=1e-12)
    with pytest.raises(ValueError, match="too small"):
        ConvEncoder((32, 32, 3), rngs=rngs)
    with pytest.raises(ValueError, match="multiples of 16"):
        ConvDecoder(3, (60, 64, 3), rngs=rngs)
    with pytest.raises(ValueError, match="expected"):
        enc(jnp.zeros((2, 48, 48, 3)))


def test_flat_image_nets_are_the_conv_stacks_on_reshaped_images():
    """The flat wrappers reshape ``(..., H W C)`` to images (shifted to [-0.5, 0.5] for the
    encoder), run the conv stacks and return ``(loc, scale > 0)`` / flattened outputs."""
    shape = (48, 48, 3)
    enc = FlatImageEncoder(shape, 3, depth=2, min_scale=0.01, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(0), (2, 5, *shape))
    loc, scale = enc(images.reshape(2, 5, -1))
    assert loc.shape == scale.shape == (2, 5, 3) and bool(jnp.all(scale >= 0.01))
    expected = enc.head(enc.trunk(images - 0.5))
    np.testing.assert_allclose(loc, expected[..., :3], rtol=1e-10)
    np.testing.assert_allclose(scale, jax.nn.softplus(expected[..., 3:]) + 0.01, rtol=1e-10)
    dec = FlatImageDecoder(3, shape, depth=2, rngs=nnx.Rngs(1))
    out = dec(loc)
    assert out.shape == (2, 5, 48 * 48 * 3)
    np.testing.assert_allclose(out, dec.net(loc).reshape(2, 5, -1), rtol=1e-12)
    with pytest.raises(ValueError, match="flattened images"):
        enc(jnp.zeros((2, 64 * 64 * 3)))
