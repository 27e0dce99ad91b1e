"""Layers for deep state space models on images: MC dropout and the PlaNet/Dreamer conv stacks.

* :class:`MCDropout` (defined in :mod:`pssm.nets`, next to the MLP that uses it; re-exported
  here): inverted dropout with an *explicit* key,
  ``y = x * m / (1 - rate)``, ``m_i = 1{u_i >= rate}``, ``u ~ U(0, 1)`` drawn from ``key``
  (so ``m_i ~ Bernoulli(1 - rate)``); the identity when ``key is None`` or ``rate == 0``. Keys
  are explicit so a network stays a pure function of its inputs (reproducible, and usable
  unchanged inside ``jit``/``scan``/NumPyro handlers). Monte-Carlo dropout (Gal & Ghahramani
  2016, "Dropout as a Bayesian Approximation") keeps the dropout active at *prediction* time:
  pass a fresh key per forward pass and the spread of the outputs over keys estimates
  epistemic uncertainty (VRKN's transition network, Becker & Neumann 2022, Sec. 3.3). Inside a
  NumPyro program obtain keys with ``numpyro.prng_key()`` (``None`` when the program runs
  without a ``seed`` handler, e.g. under plain tracing, which then switches the dropout off);
  outside one, split a ``jax.random`` key yourself. When a guide recomputes the same network
  (the Kalman guides call ``model.structure``), draw the noise ``u`` at a sample site instead
  (:meth:`MCDropout.noise_distribution`, passed as ``noise=``): the model replays the guide's
  draw, so both see the same masks, and the site adds exactly 0 to the ELBO (``q = p``).
* :class:`ConvEncoder`: the 64x64x3 image encoder of PlaNet and Dreamer (Hafner et al. 2019,
  2020): four ``4x4`` convolutions with stride 2 and ``VALID`` padding, depths
  ``depth * 2^i`` (32, 64, 128, 256), activation after each, flattened
  (``2 * 2 * 256 = 1024`` for 64x64 inputs), then an optional linear head.
* :class:`ConvDecoder`: features -> linear -> a ``(H/16, W/16, 8 depth)`` grid -> four stages of
  nearest-neighbour upsampling x2 + ``3x3`` convolution (depths 128, 64, 32, channels) -> the
  image mean. Upsample + conv instead of transposed convolutions avoids checkerboard artefacts
  (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts") and measured ~3x faster on
  this project's CPUs (REFERENCE.md).

Both conv stacks take any leading batch axes, ``(..., H, W, C)`` -> ``(..., F)`` and back.
:class:`FlatImageEncoder` and :class:`FlatImageDecoder` wrap them for models whose
observations are flattened images ``(..., H W C)`` (the EKVAE's ``p(x | a)`` and ``q(a | x)``).

Image convention (:func:`preprocess_image` / :func:`postprocess_image`): networks see floats in
``[-0.5, 0.5]``; ``uint8`` pixels ``x`` become ``floor(x / 2^(8 - bits)) / 2^bits - 0.5`` with
``bits = 8`` (Dreamer: ``x / 256 - 0.5``) or ``bits = 5`` (VRKN and PlaNet: 5-bit colour depth,
Kingma & Dhariwal 2018), optionally plus uniform dequantisation noise ``U(0, 2^-bits)``.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .nets import Activation, GaussianHead, MCDropout, default_param_dtype

__all__ = [
    "ConvDecoder",
    "ConvEncoder",
    "FlatImageDecoder",
    "FlatImageEncoder",
    "GaussianConvEncoder",
    "MCDropout",
    "postprocess_image",
    "preprocess_image",
    "upsample_nearest",
]


def preprocess_image(
    image: jax.Array, bits: int = 8, noise_key: jax.Array | None = None
) -> jax.Array:
    """``uint8`` pixels in ``[0, 255]`` -> floats in ``[-0.5, 0.5]`` at ``bits`` colour depth.

    ``floor(x / 2^(8 - bits)) / 2^bits - 0.5``, plus ``U(0, 2^-bits)`` noise when
    ``noise_key`` is given (dequantisation). ``bits=5`` is VRKN's and PlaNet's choice.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    dtype = default_param_dtype()
    x = jnp.floor(jnp.asarray(image, dtype) / 2 ** (8 - bits))
    x = x / 2**bits - 0.5
    if noise_key is not None:
        x = x + jax.random.uniform(noise_key, x.shape, dtype) / 2**bits
    return x


def postprocess_image(x: jax.Array, bits: int = 8) -> jax.Array:
    """Inverse of :func:`preprocess_image`: floats around ``[-0.5, 0.5]`` -> ``uint8``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    levels = jnp.floor((jnp.asarray(x) + 0.5) * 2**bits)
    levels = jnp.clip(levels, 0, 2**bits - 1)
    return (levels * 2 ** (8 - bits)).astype(jnp.uint8)


def _flatten_leading(x: jax.Array, event_ndim: int) -> tuple[jax.Array, tuple[int, ...]]:
    lead = x.shape[: x.ndim - event_ndim]
    return x.reshape((-1, *x.shape[x.ndim - event_ndim :])), lead


class ConvEncoder(nnx.Module):
    """Images ``(..., H, W, C)`` -> features ``(..., out_features)`` (PlaNet/Dreamer stack).

    Four ``kernel x kernel`` convolutions with stride 2, ``VALID`` padding and depths
    ``depth * 2^i``, each followed by ``activation``; the flattened result (1024 for 64x64
    images with the defaults) goes through a linear head when ``out_features`` is given.
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (64, 64, 3),
        out_features: int | None = None,
        *,
        depth: int = 32,
        kernel: int = 4,
        activation: Activation = nnx.relu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        H, W, C = (int(s) for s in image_shape)
        param_dtype = param_dtype or default_param_dtype()
        self.image_shape = (H, W, C)
        self.num_layers = 4
        for _ in range(self.num_layers):
            H, W = (H - kernel) // 2 + 1, (W - kernel) // 2 + 1
        if H < 1 or W < 1:
            raise ValueError(f"image_shape {image_shape} is too small for 4 stride-2 convs")
        channels = C
        for i in range(self.num_layers):
            conv = nnx.Conv(
                channels, depth * 2**i, (kernel, kernel), (2, 2), padding="VALID",
                param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
            setattr(self, f"conv{i}", conv)
            channels = depth * 2**i
        self.flat_features = H * W * channels
        self.head = (
            None
            if out_features is None
            else nnx.Linear(self.flat_features, out_features, param_dtype=param_dtype, rngs=rngs)
        )
        self.out_features = self.flat_features if out_features is None else int(out_features)
        self.activation = activation

    def __call__(self, image: jax.Array) -> jax.Array:
        if tuple(image.shape[-3:]) != self.image_shape:
            raise ValueError(f"image has shape {image.shape}, expected (..., {self.image_shape})")
        x, lead = _flatten_leading(image, 3)
        for i in range(self.num_layers):
            x = self.activation(getattr(self, f"conv{i}")(x))
        x = x.reshape((x.shape[0], -1))
        if self.head is not None:
            x = self.head(x)
        return x.reshape((*lead, self.out_features))


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of ``(N, H, W, C)`` to ``(N, factor H, factor W, C)``."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class ConvDecoder(nnx.Module):
    """Features ``(..., in_features)`` -> image means ``(..., H, W, C)`` (upsample + conv).

    ``linear -> (H/16, W/16, 8 depth)``, then four stages ``upsample x2 -> conv kernel x kernel
    (SAME)`` with depths ``4 depth, 2 depth, depth, C``, ``activation`` after all but the last.
    ``H`` and ``W`` must be multiples of 16.
    """

    def __init__(
        self,
        in_features: int,
        image_shape: Sequence[int] = (64, 64, 3),
        *,
        depth: int = 32,
        kernel: int = 3,
        activation: Activation = nnx.relu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        H, W, C = (int(s) for s in image_shape)
        if H % 16 or W % 16:
            raise ValueError(f"image height and width must be multiples of 16, got {image_shape}")
        param_dtype = param_dtype or default_param_dtype()
        self.image_shape = (H, W, C)
        self.grid = (H // 16, W // 16, 8 * depth)
        self.linear = nnx.Linear(
            in_features, self.grid[0] * self.grid[1] * self.grid[2],
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        depths = [8 * depth, 4 * depth, 2 * depth, depth, C]
        self.num_layers = 4
        for i in range(self.num_layers):
            conv = nnx.Conv(
                depths[i], depths[i + 1], (kernel, kernel), (1, 1), padding="SAME",
                param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip
            setattr(self, f"conv{i}", conv)
        self.activation = activation

    def __call__(self, features: jax.Array) -> jax.Array:
        x, lead = _flatten_leading(features, 1)
        x = self.linear(x).reshape((x.shape[0], *self.grid))
        for i in range(self.num_layers):
            x = getattr(self, f"conv{i}")(upsample_nearest(x))
            if i < self.num_layers - 1:
                x = self.activation(x)
        return x.reshape((*lead, *self.image_shape))


class GaussianConvEncoder(nnx.Module):
    """Images ``(..., H, W, C)`` -> ``(mean, variance)`` ``(..., out_features)`` each: a
    :class:`ConvEncoder` trunk and a :class:`pssm.nets.GaussianHead` (variance
    ``softplus + min_var``, ``init_var`` at zero input), e.g. VRKN's latent observation
    ``w_t`` and its uncertainty ``r_t``."""

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        *,
        depth: int = 32,
        min_var: float = 1e-3,
        init_var: float = 1.0,
        activation: Activation = nnx.relu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.trunk = ConvEncoder(
            image_shape, depth=depth, activation=activation, param_dtype=param_dtype, rngs=rngs
        )
        self.head = GaussianHead(
            self.trunk.out_features, out_features, min_var=min_var, init_var=init_var,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.head(self.trunk(image))


class FlatImageEncoder(nnx.Module):
    """Flattened images ``(..., H W C)`` in ``[0, 1]`` -> ``(loc, scale)`` ``(..., out_features)``
    each: the images are shifted to ``[-0.5, 0.5]``, go through a :class:`ConvEncoder` trunk and
    a linear head, ``scale = softplus(.) + min_scale`` (the encoder convention of
    :class:`inference.guides.auxiliary.GaussianEncoder`, so it can stand in for it)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        out_features: int,
        *,
        depth: int = 32,
        min_scale: float = 1e-4,
        activation: Activation = nnx.relu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.trunk = ConvEncoder(
            image_shape, depth=depth, activation=activation, param_dtype=param_dtype, rngs=rngs
        )
        dtype = param_dtype or default_param_dtype()
        self.head = nnx.Linear(self.trunk.out_features, 2 * out_features, param_dtype=dtype,
                               rngs=rngs)  # fmt: skip
        self.image_shape, self.min_scale = self.trunk.image_shape, min_scale

    def __call__(self, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        size = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        if flat.shape[-1] != size:
            raise ValueError(f"expected flattened images of {self.image_shape} ({size} values), "
                             f"got last axis {flat.shape[-1]}")  # fmt: skip
        images = flat.reshape((*flat.shape[:-1], *self.image_shape)) - 0.5
        loc, raw = jnp.split(self.head(self.trunk(images)), 2, axis=-1)
        return loc, jax.nn.softplus(raw) + self.min_scale


class FlatImageDecoder(nnx.Module):
    """Features ``(..., in_features)`` -> flattened image outputs ``(..., H W C)`` (a
    :class:`ConvDecoder`; its outputs are read as Bernoulli logits or Gaussian means by the
    model that owns it)."""

    def __init__(
        self,
        in_features: int,
        image_shape: Sequence[int],
        *,
        depth: int = 32,
        activation: Activation = nnx.relu,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.net = ConvDecoder(in_features, image_shape, depth=depth, activation=activation,
                               param_dtype=param_dtype, rngs=rngs)  # fmt: skip

    def __call__(self, features: jax.Array) -> jax.Array:
        x = self.net(features)
        return x.reshape((*x.shape[:-3], -1))
