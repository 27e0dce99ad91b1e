"""The recurrent state space model (RSSM) of PlaNet and Dreamer, on vectors and images.

A deterministic state ``h_t`` (size ``deter``) carries the past through a GRU; a stochastic
state ``z_t`` (size ``stoch``) is drawn from a diagonal Gaussian given ``h_t`` (Hafner et al.
2019, "Learning Latent Dynamics for Planning from Pixels", Eq. 4 and Fig. 2c):

    h_0 = 0,                     h_t = GRU(h_{t-1}, MLP([z_{t-1}, a_{t-1}]))     t >= 1
    z_t ~ N(mu(h_t), diag(sigma^2(h_t)))                                         (prior)
    o_t^(k) ~ N(dec_k([h_t, z_t]), diag(sigma_k^2))                              unless masked

(``sigma^2 = softplus + min_var``, Dreamer's minimum standard deviation 0.1 by default). A
modality is a vector ``(B, T, p)`` (MLP decoder) or an image ``(B, T, H, W, C)``: a
:class:`pssm.layers.ConvDecoder` (upsample + conv) predicts the mean of every pixel, with unit
variance in the preprocessed scale (PlaNet/Dreamer); ``uint8`` images are mapped to
``[-0.5, 0.5]`` at ``image_bits`` colour depth (:func:`pssm.layers.preprocess_image`; 5 bits as
PlaNet and VRKN), float images are taken as already mapped.

The posterior of the RSSM, ``q(z_t | h_t, o_t)`` with ``h_t`` recomputed from the posterior's
own samples, is the amortised filtering guide (:func:`inference.guides.filtering`, a conv
encoder for image modalities); its smoothing variant ``q(z_t | h_t, o_{t:T})`` (the "Smoothing
RSSM" of Becker & Neumann 2022, Sec. 2.3) is :mod:`inference.guides.smoothing_rssm`. Guides
reach the deterministic path through ``model.deterministic`` and nothing else. Trained with
``TraceMeanField_ELBO``, each step contributes ``KL(q(z_t | ...) || p(z_t | h_t))`` in closed
form: the RSSM objective.

Monte-Carlo dropout (``mc_dropout`` rate ``r > 0``; Gal & Ghahramani 2016, the "MCD-RSSM" of
Becker & Neumann 2022, Sec. 4.1): inverted dropout after every hidden layer of the input MLP
of the deterministic path and of the prior network. Inside the program the masks come from the
latent site ``"<name>_dropout"`` ``(B, T, 2 sum(hidden))`` ``~ U(0, 1)`` (keep where
``u >= r``; entry ``t`` drives the step into ``h_t`` and the prior of ``z_t``), drawn only
when the program runs under a ``seed`` handler (a key is available). A guide that computes the
deterministic path draws the site through ``model.dropout_noise`` and the model replays it, so
model and guide use one set of masks (one forward pass, as in a single network); its
variational distribution is its prior and it adds exactly 0 to the ELBO. Outside the program
(agents' ``imagine``) the masks come from an explicit key: every key samples other dynamics.

Acting (:mod:`pssm.belief`): the belief is one sample of the state plus a first-step flag,
:class:`RSSMBelief` ``(h_t, z_t, first)`` (PlaNet/Dreamer act on ``[h_t, z_t]``). Since the
posterior lives in the guide, ``model.belief_step(posterior)`` takes the guide's one per-step
posterior (``guide.belief_posterior`` of :func:`inference.guides.filtering` or
:func:`inference.guides.smoothing_rssm`, the function the guide's own scan applies):

    init        h = 0, z = 0, first = 1
    condition   z_t ~ q(z_t | h_t, o_t, m_t, first),  first = 0     (the guide's factor)
    predict     h_{t+1} = GRU(h_t, MLP([z_t, a_t])),  z_{t+1} ~ p(z_{t+1} | h_{t+1})
    features    [h_t, z_t]

(the smoothing guide's factor needs ``o_{t:}``; online it sees the sequence that ends at ``t``,
see there). ``predict`` is the one prior step the program scans (the same function) with MC dropout
noise drawn from its key, with the distribution and layout of one step of the site
``"<name>_dropout"`` (:func:`step_dropout_noise`): every key samples other dynamics.

Sites (conventions in :mod:`pssm.core`): ``"z_0"`` ``(B, stoch)`` and ``"z"``
``(T-1, B, stoch)`` (a NumPyro ``scan``, the plate ``"batch"`` inside its body), the
deterministic site ``"h"`` ``(B, T, deter)``, and ``"obs"`` (one array) or ``"obs_<name>"`` per
modality of a dict. The model returns the features ``[h_t, z_t]`` ``(B, T, deter + stoch)``.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.control_flow import scan

from . import nets
from .belief import BeliefStep
from .core import gaussian
from .inputs import gaussian_observations, modalities, observation_sites, prepare_inputs
from .layers import ConvDecoder, MCDropout, preprocess_image

# The posterior of one step, from the guide: ``(state_t (B, deter), obs_t, mask_t, first (B,))
# -> (mu, sigma^2)`` of ``q(z_t | ...)``; ``obs_t`` / ``mask_t`` as in :mod:`pssm.belief`.
StepPosterior = Callable[..., tuple[jax.Array, jax.Array]]


class DeterministicPath(nnx.Module):
    """``h_t = GRU(h_{t-1}, act(W [z_{t-1}, a_{t-1}] + c))``, the RSSM's deterministic path,
    with optional MC dropout after the hidden layers (masks from ``key`` or ``noise``)."""

    def __init__(
        self,
        stoch: int,
        action_dim: int,
        deter: int,
        hidden: Sequence[int],
        *,
        rate: float = 0.0,
        rngs,
    ):
        self.inputs = nets.MLP(stoch + action_dim, hidden, dropout=rate, rngs=rngs)
        self.gru = nets.GRU(self.inputs.out_features, deter, rngs=rngs)
        self.noise_size = self.inputs.noise_size

    def __call__(self, h_prev, z_prev, a_prev, key=None, *, noise=None) -> jax.Array:
        x = jnp.concatenate([z_prev, a_prev], axis=-1)
        return self.gru(h_prev, self.inputs(x, key, noise=noise))


class DropoutNoise(NamedTuple):
    """Uniform dropout noise of one sequence batch: ``path`` ``(B, T, n)`` for the step into
    ``h_t`` (entry 0 unused) and ``prior`` ``(B, T, n)`` for ``p(z_t | h_t)``."""

    path: jax.Array
    prior: jax.Array


class RSSMBelief(NamedTuple):
    """The RSSM's belief: ``h`` ``(B, deter)``, ``z`` ``(B, stoch)``, one sample of the state,
    and ``first`` ``(B,)``: no observation conditioned on yet (the guide's ``1{t = 0}``)."""

    h: jax.Array
    z: jax.Array
    first: jax.Array


def step_dropout_noise(key, batch_size: int, path_size: int, prior_size: int, dtype):
    """One step of the dropout site ``"<name>_dropout"`` from ``key``: ``u ~ U(0, 1)``
    ``(B, path_size + prior_size)``, split as the site is (deterministic path first)."""
    u = jax.random.uniform(key, (batch_size, path_size + prior_size), dtype)
    return DropoutNoise(u[:, :path_size], u[:, path_size:])


def score_rewards(rewards: jax.Array, features: jax.Array, head) -> None:
    """Score ``rewards[:, t] ~ N(head(features[:, t + 1]), 1)`` for ``t < T - 1`` at the site
    ``"reward"`` inside the plate ``"batch"`` (``head`` maps ``(..., F) -> (..., 1)``)."""
    rewards = jnp.asarray(rewards)
    B, T = features.shape[:2]
    if rewards.shape != (B, T):
        raise ValueError(f"rewards has shape {rewards.shape}, expected ({B}, {T})")
    mean = head(features[:, 1:])[..., 0]
    with numpyro.plate("batch", B):
        numpyro.sample("reward", dist.Normal(mean, 1.0).to_event(1), obs=rewards[:, :-1])


def is_image(shape) -> bool:
    """Whether a modality's shape (from :func:`pssm.inputs.modalities`) is an image
    ``(H, W, C)``."""
    return isinstance(shape, tuple) and len(shape) == 3


def rssm(
    obs_dim: int | tuple[int, ...] | Mapping[str, int | tuple[int, ...]],
    action_dim: int = 0,
    stoch: int = 30,
    deter: int = 200,
    hidden: int | Sequence[int] = 200,
    *,
    min_var: float = 0.01,
    obs_var: float = 1.0,
    learn_obs_var: bool = False,
    min_obs_var: float = 0.01,
    reward: bool = False,
    mc_dropout: float = 0.0,
    conv_depth: int = 32,
    image_bits: int = 5,
    name: str = "rssm",
    seed: int = 0,
):
    """Build an RSSM (equations in the module docstring).

    Args:
        obs_dim: one modality's shape (``p`` for vectors ``(B, T, p)``, ``(H, W, C)`` for images
            ``(B, T, H, W, C)``, H and W multiples of 16), or ``{modality: shape}``.
        action_dim: ``u`` (``0``: no actions).
        stoch, deter: sizes of ``z_t`` and ``h_t`` (PlaNet/Dreamer: 30 and 200).
        hidden: width of the one hidden layer of each network, or a sequence of widths.
        min_var: floor of the prior variance.
        obs_var, learn_obs_var, min_obs_var: decoder variance ``sigma_k^2``, fixed (Dreamer's
            unit-variance Gaussian) or learned per modality and entry above ``min_obs_var``.
        reward: add a reward head (``model.reward``; scored when ``rewards`` are passed).
        mc_dropout: MC-dropout rate in the deterministic path's input MLP and the prior network
            (``0``: none; the model is then exactly the one without the option).
        conv_depth: channel multiplier of the image decoders (PlaNet/Dreamer: 32).
        image_bits: colour depth integer images are reduced to (:func:`preprocess_image`).
        name: prefix of the parameter sites ``"<name>_deterministic$params"``,
            ``"<name>_prior$params"``, ``"<name>_decoder_<modality>$params"``,
            ``"<name>_reward$params"`` and of the dropout site ``"<name>_dropout"``.
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None, rewards=None, pixel_mask=None)`` (``pixel_mask``:
        per-pixel likelihood masks, :func:`pssm.inputs.gaussian_observations`) carrying

        * ``model.deterministic()``: registers the deterministic path's parameter sites (the
          model's own: a guide calling it shares them) and returns the pure function
          ``(h_prev, z_prev, a_prev, key=None, *, noise=None) -> h``. Call it outside any
          ``scan`` and use the function inside; ``a_prev`` is ``(..., 0)`` for a model without
          actions; ``key`` or ``noise`` (``dropout_noise(...).path[:, t]``) switch MC dropout on.
        * ``model.prior()``: ``(h, key=None, *, noise=None) -> (mu, sigma^2)`` of
          ``p(z_t | h_t)``; ``model.decoders()``: ``{modality: features -> mean}``;
          ``model.reward()``: ``features (..., F) -> (...)``.
        * ``model.dropout_noise(B, T)``: samples the site ``"<name>_dropout"`` and returns a
          :class:`DropoutNoise`, or ``None`` (no dropout, or no key available); a guide that
          recomputes ``h`` calls it so that model and guide share the masks.
        * ``model.belief_step(posterior)``: the online filter for agents (module docstring).
        * ``model.preprocess(obs)``: integer images to floats (what the networks see).
        * ``model.latent_dim`` (``stoch``), ``model.deterministic_size`` (``deter``),
          ``model.feature_size`` (``deter + stoch``), ``model.action_dim``, ``model.obs_dims``,
          ``model.mc_dropout`` (the rate).
    """
    dims, u = modalities(obs_dim), int(action_dim)
    for k, s in dims.items():
        if not (isinstance(s, int) or is_image(s)):
            raise ValueError(f"modality {k!r} has shape {s}: the RSSM takes p or (H, W, C)")
    rate = float(mc_dropout)
    widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    rngs = nnx.Rngs(seed)
    path = DeterministicPath(stoch, u, deter, widths, rate=rate, rngs=rngs)
    prior = nets.GaussianMLP(deter, widths, stoch, min_var=min_var, dropout=rate, rngs=rngs)
    F = deter + stoch
    decoders = {
        k: ConvDecoder(F, s, depth=conv_depth, rngs=rngs)
        if is_image(s)
        else nets.MLP(F, widths, s, rngs=rngs)
        for k, s in dims.items()
    }
    reward_head = nets.MLP(F, widths, 1, rngs=rngs) if reward else None
    sites = observation_sites(obs_dim)

    def preprocess(obs):
        """Integer images -> floats in ``[-0.5, 0.5]`` (any leading axes); the rest as given."""

        def one(k, o):
            o = jnp.asarray(o) if k in dims and is_image(dims[k]) else o
            if k in dims and is_image(dims[k]) and jnp.issubdtype(o.dtype, jnp.integer):
                return preprocess_image(o, image_bits)
            return o

        if isinstance(obs, Mapping):
            return {k: one(k, o) for k, o in obs.items()}
        return one("obs", obs)

    def deterministic():
        return nets.register(f"{name}_deterministic", path)

    def prior_fn():
        """Register the prior network; returns ``h -> (mu, sigma^2)`` of ``p(z_t | h_t)``."""
        return nets.register(f"{name}_prior", prior)

    def dropout_noise(B: int, T: int) -> DropoutNoise | None:
        if not rate or numpyro.prng_key() is None:
            return None
        n = path.noise_size
        with numpyro.plate("batch", B):
            u_ = numpyro.sample(
                f"{name}_dropout",
                MCDropout.noise_distribution((T, n + prior.noise_size)).to_event(2),
            )
        return DropoutNoise(u_[..., :n], u_[..., n:])

    def transition(path_fn, prior_net):
        """The one prior step of the program and of ``predict`` from the registered networks,
        ``(h_{t-1}, z_{t-1}, a_{t-1}, noise) -> (h_t, (mu, sigma^2))`` of ``p(z_t | h_t)``
        (``noise``: one step's :class:`DropoutNoise`, or ``None``)."""

        def step(h, z, a, noise=None):
            h = path_fn(h, z, a, noise=None if noise is None else noise.path)
            return h, prior_net(h, noise=None if noise is None else noise.prior)

        return step

    def model(obs, actions=None, mask=None, rewards=None, pixel_mask=None):
        x = prepare_inputs(obs_dim, u, preprocess(obs), actions, mask)
        B, T = x.mask.shape[:2]
        prior_net = prior_fn()
        step = transition(deterministic(), prior_net)
        drop = dropout_noise(B, T)
        h0 = jnp.zeros((B, deter), nets.default_param_dtype())
        with numpyro.plate("batch", B):
            z0 = numpyro.sample(
                "z_0", gaussian(*prior_net(h0, noise=None if drop is None else drop.prior[:, 0]))
            )
        a_prev = jnp.zeros((B, T, 0), h0.dtype) if x.actions is None else x.actions
        a_prev = jnp.moveaxis(a_prev[:, :-1], 1, 0)  # (T-1, B, u): a_{t-1} for t = 1..T-1
        noise = None if drop is None else jax.tree.map(lambda v: jnp.moveaxis(v[:, 1:], 1, 0), drop)

        def scan_step(carry, xs):
            h, z = carry
            a, n = xs
            h, prior_t = step(h, z, a, n)
            with numpyro.plate("batch", B):
                z = numpyro.sample("z", gaussian(*prior_t))
            return (h, z), (h, z)

        if T > 1:  # T = 1: z_0 alone, no site "z" (as pssm.core.sample_latent_path)
            _, (hs, zs) = scan(scan_step, (h0, z0), (a_prev, noise))
        else:  # NumPyro's scan cannot replay a length-0 site
            hs, zs = jnp.zeros((0, B, deter), h0.dtype), jnp.zeros((0, B, stoch), z0.dtype)
        h = jnp.concatenate([h0[:, None], jnp.moveaxis(hs, 0, 1)], axis=1)
        z = jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)
        numpyro.deterministic("h", h)
        features = jnp.concatenate([h, z], axis=-1)
        means = {k: nets.register(f"{name}_decoder_{k}", decoders[k])(features) for k in dims}
        gaussian_observations(
            x, means, sites, prefix=name, obs_var=obs_var, learn_obs_var=learn_obs_var,
            min_obs_var=min_obs_var, pixel_mask=pixel_mask,
        )  # fmt: skip
        if rewards is not None:
            score_rewards(rewards, features, nets.register(f"{name}_reward", reward_head))
        return features

    def reward_fn():
        """Register the reward head; returns ``features (..., F) -> (...)``."""
        if reward_head is None:
            raise ValueError("this RSSM was built without a reward head (reward=True)")
        head = nets.register(f"{name}_reward", reward_head)
        return lambda f: head(f)[..., 0]

    def decoder_fns():
        """Register the decoders; returns ``{modality: features (..., F) -> mean}``."""
        return {k: nets.register(f"{name}_decoder_{k}", decoders[k]) for k in dims}

    def belief_step(posterior: Callable[[], StepPosterior]) -> BeliefStep:
        """The online filter of the RSSM (:mod:`pssm.belief`; equations in the module docstring).

        Args:
            posterior: the guide's ``belief_posterior`` (called here, so that its networks are
                registered under the caller's parameters), which returns the guide's per-step
                factor ``(h_t, obs_t, mask_t, first (B,)) -> (mu, sigma^2)``.

        Returns:
            A :class:`pssm.belief.BeliefStep` over :class:`RSSMBelief`: ``condition`` draws
            ``z_t = mu + sigma * eps`` (``eps`` from its key) from the guide's factor, even
            where ``o_t`` is fully masked (as the guide does in training); ``predict`` is the
            program's transition with dropout noise from its key (``key -> (k_noise, key)`` when
            ``mc_dropout > 0``, :func:`step_dropout_noise` from ``k_noise``), then
            ``z_{t+1} = mu + sigma * eps`` with ``eps`` from ``key``.
        """
        q = posterior()
        step = transition(deterministic(), prior_fn())
        head = None if reward_head is None else reward_fn()
        dec = decoder_fns()

        def init(batch_size):
            dtype = nets.default_param_dtype()
            return RSSMBelief(
                jnp.zeros((batch_size, deter), dtype),
                jnp.zeros((batch_size, stoch), dtype),
                jnp.ones((batch_size,), bool),
            )

        def draw(key, mu, var):
            return mu + jnp.sqrt(var) * jax.random.normal(key, mu.shape, mu.dtype)

        def condition(belief, obs, mask, key):
            mu, var = q(belief.h, obs, mask, belief.first)
            return RSSMBelief(belief.h, draw(key, mu, var), jnp.zeros_like(belief.first))

        def predict(belief, action, key):
            B = belief.h.shape[0]
            a = jnp.asarray(action, belief.h.dtype).reshape(B, u)
            noise = None
            if rate:
                k_noise, key = jax.random.split(key)
                noise = step_dropout_noise(
                    k_noise, B, path.noise_size, prior.noise_size, belief.h.dtype
                )
            h, (mu, var) = step(belief.h, belief.z, a, noise)
            return RSSMBelief(h, draw(key, mu, var), jnp.zeros_like(belief.first))

        def features(belief):
            return jnp.concatenate([belief.h, belief.z], axis=-1)

        def decode(f):
            out = {k: fn(f) for k, fn in dec.items()}
            return out if isinstance(obs_dim, Mapping) else out["obs"]

        return BeliefStep(init, condition, predict, features, head, decode)

    model.reward, model.decoders, model.prior = reward_fn, decoder_fns, prior_fn
    model.belief_step = belief_step
    model.deterministic, model.dropout_noise, model.preprocess = (
        deterministic,
        dropout_noise,
        preprocess,
    )
    model.latent_dim, model.deterministic_size, model.feature_size = stoch, deter, F
    model.action_dim, model.obs_dims, model.mc_dropout = u, dims, rate
    return model
