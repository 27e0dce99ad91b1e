"""The Variational Recurrent Kalman Network (VRKN; Becker & Neumann 2022, "On Uncertainty in
Deep State Space Models for Model-Based Reinforcement Learning", TMLR).

For ``K`` modalities ``o_t^(k)`` (vectors or images) and a latent state ``z_t`` of size ``d``:

    encoders      w_t^(k), r_t^(k) = enc_k(o_t^(k))                  (conv for images, MLP else)
    filter        mu_0^- = m_0, P_0^- = P_0;   mu_t^+, P_t^+ = update(mu_t^-, P_t^-, {w, r, m}_t)
    transition    A_t, b_t, Q_t = phi_2(GRU(phi_1(mu_t^+, a_t), mu_t^+))    (Sec. 3.2, Fig. 3b)
                  A_t in [0.1, 0.99] (0.9 at 0), Q_t in [1e-3, 0.1] (0.01 at 0), b_t linear
                  mu_{t+1}^- = A_t mu_t^+ + b_t,   P_{t+1}^- = A_t^2 P_t^+ + Q_t
    prior         z_0 ~ N(m_0, diag(P_0)),   z_{t+1} ~ N(A_t z_t + b_t, diag(Q_t))
    likelihood    o_t^(k) ~ N(dec_k(z_t), sigma_k^2 I)  unless masked;  rew_t ~ N(head(z_{t+1}), 1)

``update`` is the Kalman update with the latent observations ``w_t^(k) = z_t + N(0, r_t^(k))``,
elementwise (diagonal ``A_t``, ``P``, ``r``), fusing the observed modalities of a step in
information form (the same as one update per sensor in turn, in any order; a masked modality
is skipped). The dynamics are *linearised at the filtered mean* (like an extended Kalman
filter), so the filter is recurrent: :func:`vrkn` runs it in one ``lax.scan`` that at each step
computes ``(A_t, b_t, Q_t)`` from ``mu_t^+`` and ``a_t``, predicts and updates with
``w_{t+1}``, and hands the resulting latent LGSSM to the Kalman guides through
``model.structure`` (``inference.guides.kalman_smoothing`` gives the smoothing posterior and,
with ``TraceMeanField_ELBO``, the VRKN bound, Eq. 3). As in the official implementation
(``pbecker93/vrkn``), gradients flow through the filtered means into the transition network
(nothing is detached). The GRU's hidden state is the filtered mean itself: no memory beyond
``z``.

Epistemic uncertainty: Monte-Carlo dropout (rate 0.1) after ``phi_1``, after the GRU and after
the hidden layer of ``phi_2`` (Sec. 3.3; ``mc_dropout=False`` is "VRKN (no MCD)"). The masks
are latent variables: the site ``"<name>_dropout"`` ``(B, T-1, 2 hidden + d)`` ~ ``U(0, 1)``
(keep where ``u >= rate``) is drawn in ``structure``, so the guide (which calls
``structure``) and the model (which replays the guide's trace) use the same masks, as the
official code's single forward pass does; its variational distribution is its prior, so it
adds exactly 0 to the ELBO. Under ``Predictive`` without a guide the masks are fresh draws:
MC-dropout predictions. The site is drawn only under a ``seed`` handler (as in
:mod:`pssm.rssm`); without a key the transition runs without dropout.

Choices that differ from the official code: ``m_0`` is learned (there: fixed at 0); the
initial-state KL enters the bound with weight 1 (there: 0 by default); the ELBO is a sum over
batch and time (there: a mean, so learning rates differ by that factor).

Images: ``uint8`` arrays are mapped to ``[-0.5, 0.5]`` at ``image_bits`` colour depth (5, as
VRKN and PlaNet; :func:`pssm.layers.preprocess_image`), float arrays are taken as already
mapped; decoders predict in that space. Training: :class:`inference.objectives.FreeNatsELBO`
(free nats 3 per ``(batch, time)`` element, as VRKN). Sites and conventions as in :mod:`pssm.core` /
:mod:`pssm.inputs`: ``"z_0"``, ``"z"``, ``"obs"`` or ``"obs_<name>"``, ``"reward"``.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from flax import nnx
from numpyro.distributions import constraints

from inference import kalman

from . import nets
from .belief import BeliefStep
from .core import Structure, linear_gaussian, model_prior_conditionals, sample_latent_path
from .inputs import (
    Inputs,
    gaussian_observations,
    latent_emissions,
    modalities,
    observation_sites,
    observed_size,
    partial_observation,
    prepare_inputs,
)
from .layers import ConvDecoder, GaussianConvEncoder, MCDropout, preprocess_image
from .nets import VRKNTransition  # VRKN's dynamics model, shared with pssm.kalmamba
from .observations import step_observations
from .rssm import score_rewards

__all__ = [
    "Networks",
    "VRKNBelief",
    "VRKNTransition",
    "vrkn",
]


class VRKNBelief(NamedTuple):
    """The filtered ``N(mean, diag(var))`` and one ``sample`` of the state, ``(B, d)`` each (the
    official code keeps the same triple; the sample is what it feeds actor, critic and heads)."""

    mean: jax.Array
    var: jax.Array
    sample: jax.Array


class Networks(NamedTuple):
    """A VRKN's networks as pure functions of their (registered or substituted) parameters.

    Attributes:
        encoders: ``{modality: o (..., *shape) -> (w, r)}`` on preprocessed observations.
        transition: ``(mean, action, key=None, noise=None) -> (A, b, Q)``.
        decoders: ``{modality: z (..., d) -> mean (..., *shape)}``.
        reward: ``z (..., d) -> (...)`` or ``None`` without a reward head.
        initial: ``N(m_0, diag(P_0))``, ``(d,)`` each.
    """

    encoders: dict[str, Callable]
    transition: Callable
    decoders: dict[str, Callable]
    reward: Callable | None
    initial: kalman.Gaussian


def _widths(hidden) -> tuple[int, ...]:
    return (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)


def vrkn(
    obs_dims,
    action_dim: int = 0,
    latent_dim: int = 230,
    hidden: int = 300,
    *,
    mlp_hidden: int | Sequence[int] = (300, 300),
    mc_dropout: bool = True,
    dropout_rate: float = 0.1,
    reward: bool = False,
    obs_var: float = 1.0,
    min_latent_obs_var: float = 0.01,
    min_initial_var: float = 1e-3,
    A_bounds: tuple[float, float, float] = (0.1, 0.99, 0.9),
    Q_bounds: tuple[float, float, float] = (1e-3, 0.1, 1e-2),
    image_bits: int = 5,
    conv_depth: int = 32,
    observed_dim: int | None = None,
    name: str = "vrkn",
    seed: int = 0,
):
    """Build a VRKN (equations in the module docstring).

    Args:
        obs_dims: one modality's shape (``p`` or ``(H, W, C)``) or ``{modality: shape}``; a
            3-axis shape is an image (conv encoder and decoder; height and width multiples of
            16), an int a vector (MLP encoder and decoder).
        action_dim: ``u`` (``0``: no actions).
        latent_dim: ``d`` (VRKN: 230).
        hidden: width of the transition network (VRKN: 300).
        mlp_hidden: hidden widths of vector encoders and decoders and of the reward head.
        mc_dropout: Monte-Carlo dropout in the transition network (``False``: "VRKN (no MCD)").
        dropout_rate: its rate (VRKN: 0.1).
        reward: add a reward head; the model then scores ``rewards[:, t]`` against ``z_{t+1}``.
        obs_var: fixed decoder variance ``sigma_k^2``.
        min_latent_obs_var: floor of the encoders' variances ``r_t`` (initial value 1).
        min_initial_var: floor of the learned ``P_0`` (initial value 1; ``m_0`` starts at 0).
        A_bounds, Q_bounds: ``(lo, hi, value at zero)`` of the transition entries and variances.
        image_bits: colour depth integer images are reduced to (:func:`preprocess_image`).
        conv_depth: base depth of the conv encoder and decoder (32).
        observed_dim: ``m``, how many latent coordinates the latent observations cover
            (``None``: all, ``H = I`` as VRKN). With ``m < d`` the encoders emit ``m``
            coordinates and the observation model is RKN's ``H = [I_m, 0]`` (Becker et al.
            2019): coordinates ``m..d-1`` are never observed (their ``r`` is ``inf``, so the
            elementwise update leaves them alone) and are filled only by the transition's
            offset ``b_t(mu_t^+, a_t)``: a memory, e.g. for a velocity that one frame does not
            show.
        name: prefix of the parameter sites ``"<name>_encoder_<modality>$params"``,
            ``"<name>_transition$params"``, ``"<name>_decoder_<modality>$params"``,
            ``"<name>_reward$params"``, ``"<name>_m0"``, ``"<name>_P0"`` and of the dropout
            site ``"<name>_dropout"``.
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None, rewards=None, pixel_mask=None)`` (``pixel_mask``:
        per-pixel likelihood masks, :func:`pssm.inputs.gaussian_observations`) with latent sites
        ``"z_0"``, ``"z"``, returning ``z`` ``(B, T, d)`` and carrying ``model.structure`` (for
        the Kalman guides), ``model.filter(obs, actions=None, mask=None)`` (the filtered beliefs
        ``(B, T, d)`` as a ``kalman.Gaussian``), ``model.networks()`` (registers every
        parameter site, returns :class:`Networks`), ``model.preprocess(obs)`` (images to
        floats), ``model.latent_dim``, ``model.feature_size`` (``d``), ``model.action_dim``,
        ``model.obs_dims`` and ``model.mc_dropout``.
    """
    dims = modalities(obs_dims)
    for k, s in dims.items():
        if not isinstance(s, int) and len(s) != 3:
            raise ValueError(f"modality {k!r}: shape {s} is neither a vector nor (H, W, C)")
    d, u = int(latent_dim), int(action_dim)
    m = observed_size(observed_dim, d)
    widths = _widths(mlp_hidden)
    rngs = nnx.Rngs(seed)
    images = {k for k, s in dims.items() if not isinstance(s, int)}
    encoders = {
        k: GaussianConvEncoder(s, m, depth=conv_depth, min_var=min_latent_obs_var, rngs=rngs)
        if k in images
        else nets.GaussianMLP(s, widths, m, min_var=min_latent_obs_var, rngs=rngs)
        for k, s in dims.items()
    }
    rate = float(dropout_rate) if mc_dropout else 0.0
    transition = VRKNTransition(
        d, u, hidden, rate=rate, A_bounds=A_bounds, Q_bounds=Q_bounds, rngs=rngs
    )
    decoders = {
        k: ConvDecoder(d, s, depth=conv_depth, rngs=rngs)
        if k in images
        else nets.MLP(d, widths, s, rngs=rngs)
        for k, s in dims.items()
    }
    reward_head = nets.MLP(d, widths, 1, rngs=rngs) if reward else None
    sites = observation_sites(obs_dims)
    dtype = nets.default_param_dtype()

    def preprocess(obs):
        """Integer images -> floats in ``[-0.5, 0.5]``; everything else unchanged."""

        def one(k, o):
            o = jnp.asarray(o)
            if k in images and jnp.issubdtype(o.dtype, jnp.integer):
                return preprocess_image(o, image_bits)
            return o

        if isinstance(obs, Mapping):
            return {k: one(k, o) for k, o in obs.items()}
        return one("obs", obs)

    def networks() -> Networks:
        enc = {
            k: partial_observation(nets.register(f"{name}_encoder_{k}", encoders[k]), d)
            for k in dims
        }
        dec = {k: nets.register(f"{name}_decoder_{k}", decoders[k]) for k in dims}
        head = None
        if reward_head is not None:
            head_fn = nets.register(f"{name}_reward", reward_head)
            head = lambda z: head_fn(z)[..., 0]
        m0 = numpyro.param(f"{name}_m0", jnp.zeros(d, dtype))
        P0 = numpyro.param(
            f"{name}_P0", jnp.ones(d, dtype), constraint=constraints.greater_than(min_initial_var)
        )
        trans = nets.register(f"{name}_transition", transition)
        return Networks(enc, trans, dec, head, kalman.Gaussian(m0, P0))

    def dropout_noise(B: int, T: int):
        """The dropout noise of the transition network, ``(B, T-1, 2 hidden + d)``, or ``None``
        (no MC dropout, or no ``seed`` handler: no key, no dropout)."""
        if not rate or numpyro.prng_key() is None:
            return None
        shape = (T - 1, transition.noise_size)
        with numpyro.plate("batch", B):
            return numpyro.sample(
                f"{name}_dropout", MCDropout.noise_distribution(shape).to_event(2)
            )

    names = list(dims)

    def encode(n: Networks, obs: Mapping) -> tuple[jax.Array, jax.Array]:
        """The latent observations ``w, R`` ``(..., K, d)`` of every modality."""
        w, R = zip(*(n.encoders[k](obs[k]) for k in names), strict=True)
        return jnp.stack(w, axis=-2), jnp.stack(R, axis=-2)

    def advance(n: Networks, belief: kalman.Gaussian, action, key=None, noise=None):
        """The prior step: dynamics linearised at the filtered mean, and the predicted belief."""
        dynamics = kalman.Dynamics(*n.transition(belief.mean, action, key, noise=noise))
        return dynamics, kalman.predict(belief, dynamics)

    def filtered_lgssm(x: Inputs, n: Networks) -> tuple[Structure, kalman.Gaussian]:
        """The recurrent filter: the latent LGSSM and the filtered beliefs ``(B, T, d)``."""
        w, R = encode(n, x.obs)  # (B, T, K, d)
        B, T = x.mask.shape[:2]
        noise = dropout_noise(B, T)
        actions = jnp.zeros((B, T, 0), w.dtype) if x.actions is None else x.actions
        time = lambda v: jnp.moveaxis(v, 1, 0)
        m0 = jnp.broadcast_to(n.initial.mean, (B, d))
        P0 = jnp.broadcast_to(n.initial.cov, (B, d))
        first, _ = kalman.update(kalman.Gaussian(m0, P0), w[:, 0], R[:, 0], x.mask[:, 0])

        def step(belief, xs):  # filtered belief at t -> (A_t, b_t, Q_t), filtered at t + 1
            a_t, noise_t, w_next, R_next, mask_next = xs
            dynamics, predicted = advance(n, belief, a_t.astype(w.dtype), noise=noise_t)
            filtered, _ = kalman.update(predicted, w_next, R_next, mask_next)
            return filtered, (*dynamics, *filtered)

        xs = (actions[:, :-1], noise, w[:, 1:], R[:, 1:], x.mask[:, 1:])
        xs = jax.tree.map(time, xs)
        _, (A, b, Q, means, variances) = jax.lax.scan(step, first, xs)
        A, b, Q, means, variances = map(time, (A, b, Q, means, variances))
        filtered = kalman.Gaussian(
            jnp.concatenate([first.mean[:, None], means], axis=1),
            jnp.concatenate([first.cov[:, None], variances], axis=1),
        )
        prior = kalman.Gaussian(m0, P0)
        emissions = kalman.Emissions(w, R, x.mask) if m == d else latent_emissions(w, R, x.mask)
        structure = Structure(prior, kalman.Dynamics(A, b, Q), emissions)
        return structure, filtered

    def inputs(obs, actions, mask) -> Inputs:
        return prepare_inputs(obs_dims, u, preprocess(obs), actions, mask)

    def structure(obs, actions=None, mask=None) -> Structure:
        return filtered_lgssm(inputs(obs, actions, mask), networks())[0]

    def filter_beliefs(obs, actions=None, mask=None) -> kalman.Gaussian:
        return filtered_lgssm(inputs(obs, actions, mask), networks())[1]

    def belief_step(features: str = "mean") -> BeliefStep:
        """The online filter (:mod:`pssm.belief`) from the steps ``filtered_lgssm`` scans:
        ``condition`` is the Kalman update on the encoders' latent observations, ``predict``
        the transition linearised at the belief mean (fresh MC-dropout masks from ``key``)
        followed by the Kalman prediction; the sample is redrawn from the updated belief and
        pushed ancestrally through ``z' = A z + b + sqrt(Q) eps`` (reparameterised), so it
        stays a draw from the belief. ``features``: ``"mean"`` or ``"sample"``."""
        if features not in ("mean", "sample"):
            raise ValueError(f"features must be 'mean' or 'sample', got {features!r}")
        n = networks()

        def init(batch_size):
            mean = jnp.broadcast_to(n.initial.mean, (batch_size, d))
            return VRKNBelief(mean, jnp.broadcast_to(n.initial.cov, mean.shape), mean)

        def condition(belief, obs, mask, key):
            obs, seen = step_observations(preprocess(obs), mask, names)
            w, R = encode(n, {k: o.astype(belief.mean.dtype) for k, o in obs.items()})
            post, _ = kalman.update(kalman.Gaussian(belief.mean, belief.var), w, R, seen)
            eps = jax.random.normal(key, post.mean.shape, post.mean.dtype)
            return VRKNBelief(post.mean, post.cov, post.mean + jnp.sqrt(post.cov) * eps)

        def predict(belief, action, key):
            k_drop, k_eps = jax.random.split(key)
            a = jnp.asarray(action, belief.mean.dtype).reshape(belief.mean.shape[0], u)
            now = kalman.Gaussian(belief.mean, belief.var)
            (A, b, Q), pred = advance(n, now, a, key=k_drop if rate else None)
            eps = jax.random.normal(k_eps, pred.mean.shape, pred.mean.dtype)
            return VRKNBelief(pred.mean, pred.cov, A * belief.sample + b + jnp.sqrt(Q) * eps)

        def decode(f):
            out = {k: fn(f) for k, fn in n.decoders.items()}
            return out if isinstance(obs_dims, Mapping) else out[names[0]]

        pick = (lambda b: b.mean) if features == "mean" else (lambda b: b.sample)
        return BeliefStep(init, condition, predict, pick, n.reward, decode)

    @linear_gaussian(structure)
    def model(obs, actions=None, mask=None, rewards=None, pixel_mask=None):
        x = inputs(obs, actions, mask)
        n = networks()
        s, _ = filtered_lgssm(x, n)
        z = sample_latent_path(*model_prior_conditionals(s))
        means = {k: n.decoders[k](z) for k in dims}
        gaussian_observations(x, means, sites, prefix=name, obs_var=obs_var, pixel_mask=pixel_mask)
        if rewards is not None:
            if n.reward is None:
                raise ValueError("this VRKN has no reward head: build it with reward=True")
            score_rewards(rewards, z, lambda f: n.reward(f)[..., None])
        return z

    model.filter, model.networks, model.preprocess = filter_beliefs, networks, preprocess
    model.belief_step = belief_step
    model.latent_dim = model.feature_size = d
    model.action_dim, model.obs_dims, model.mc_dropout = u, dims, bool(rate)
    model.observed_dim = m
    return model
