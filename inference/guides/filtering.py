"""Filtering guide family (RSSM / PlaNet / Dreamer):

    q(z_{0:T-1} | o) = q(z_0 | o_0) prod_t q(z_t | z_{t-1}, a_{t-1}, o_t)

Each factor sees the past (through the sampled previous state) and the current observation
only, never the future: the RSSM bound of the VRKN paper (Becker & Neumann 2022, Eq. 3). The
closed-form member uses the exact one-step posterior ``p(z_t | z_{t-1}, o_t)`` of a model's
latent LGSSM (the VRKN paper's "CF" variant of Figure 2); it reads the model only through
``model.structure`` (:class:`pssm.core.LinearGaussian`). The amortised member
(:func:`filtering`) learns the factors with a network, the RSSM posterior of Hafner et al.
(2019, "Learning Latent Dynamics for Planning from Pixels", Fig. 2c; the encoder lives in the
guide, the inference network):

    e_t = [emb_1(o_t^(1)) m_t^1, ..., emb_K(o_t^(K)) m_t^K]     embeddings, 0 where missing
    h_0 = 0,   h_t = f(h_{t-1}, z_{t-1}, a_{t-1})                  the model's deterministic path
    q(z_t | z_{<t}, o_{<=t}) = N(mu, diag(sigma^2)),   (mu, sigma^2) = net([h_t, e_t, m_t, 1{t=0}])

``emb_k`` is the PlaNet/Dreamer conv encoder (:class:`pssm.layers.ConvEncoder`, four stride-2
convolutions, 1024 features for 64x64 images) for an image modality ``(H, W, C)`` and the
identity (flattened) for a vector. For a model without a deterministic path the state is
``s_t = [z_{t-1}, a_{t-1}]`` (zeros at ``t = 0``) in place of ``h_t``. A model with MC dropout
(``model.dropout_noise``, :func:`pssm.rssm.rssm`) has its dropout site drawn here and replayed
by the model, so both compute ``h`` with the same masks.

What the amortised guides read of a model (protocols of :mod:`pssm.core`, each used when the
model offers it): :class:`pssm.core.DeterministicPath` (``h_t``), :class:`pssm.core.Dimensions`
(modalities, action and latent sizes; else read from the data) and
:class:`pssm.core.Preprocessed` (the model's data preprocessing); their per-step posterior for
agents needs :class:`pssm.core.Dimensions`.

One factor, written once: :func:`filtering` builds it (:func:`filtering_factor`) and both its
sequence scan (:func:`sample_states`, all steps' ``[e_t, m_t, 1{t=0}]`` at once) and its
per-step posterior for agents (``guide.belief_posterior``, what
:meth:`pssm.rssm.rssm`'s ``belief_step`` conditions with) apply it.

The pieces shared with the smoothing guide (:mod:`inference.guides.smoothing_rssm`) live here:
:func:`guide_inputs` (validation and image preprocessing as the model does it),
:class:`GuideNetworks` (lazily built networks with concrete initial weights),
:func:`posterior_factor` (the factor on ``[s_t, seen_t]``), :func:`sample_states` (the
recursion over ``s_t`` and the sites ``"z_0"``, ``"z"``) and :func:`step_inputs` (one step's
observations for a belief step).
"""

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpyro
from flax import nnx
from numpyro.contrib.control_flow import scan

from inference import kalman
from pssm.core import (
    DeterministicPath,
    Dimensions,
    LinearGaussian,
    Preprocessed,
    gaussian,
    require,
    sample_latent_path,
)
from pssm.inputs import Inputs, event_shape, prepare_inputs
from pssm.layers import ConvEncoder
from pssm.nets import GRU, GaussianMLP, default_param_dtype, register
from pssm.observations import step_observations

# ``(state_t (..., s), seen_t (..., n)) -> (mu, sigma^2)``: a guide's factor of z_t.
Factor = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def closed_form_filtering(model):
    """Guide: ``prod_t p(z_t | z_{t-1}, o_t)`` from the model's latent LGSSM (exact factors)."""
    require(model, LinearGaussian, "closed_form_filtering")

    def guide(obs, *args, rewards=None, **kwargs):  # rewards: scored by the model only
        s = model.structure(obs, *args, **kwargs)
        first, conditionals = jax.vmap(kalman.one_step_conditionals)(*s)
        return sample_latent_path(first, conditionals)

    return guide


# --- shared by the amortised guides (filtering, smoothing_rssm) ----------------------------------


def _is_image(shape) -> bool:
    return isinstance(shape, tuple) and len(shape) == 3


def guide_inputs(model, obs, actions=None, mask=None) -> Inputs:
    """Validated inputs as the model sees them: ``model.preprocess`` (integer images to floats)
    if the model is :class:`pssm.core.Preprocessed`, modalities in the order of
    ``model.obs_dims`` and its ``action_dim`` if it offers :class:`pssm.core.Dimensions` (else
    both read from the data), masked entries zero."""
    obs = _preprocessed(model, obs)
    if isinstance(model, Dimensions):
        dims, u = model.obs_dims, model.action_dim
        if not isinstance(obs, Mapping) and list(dims) == ["obs"]:
            dims = dims["obs"]
    else:
        if isinstance(obs, Mapping):
            dims = {k: tuple(jnp.shape(o)[2:]) for k, o in obs.items()}
        else:
            dims = tuple(jnp.shape(obs)[2:])
        u = 0 if actions is None else jnp.shape(actions)[-1]
    return prepare_inputs(dims, u, obs, actions, mask)


def _preprocessed(model, obs):
    return model.preprocess(obs) if isinstance(model, Preprocessed) else obs


def step_inputs(model, obs, mask):
    """One step's observations as :func:`guide_inputs` gives a sequence's: ``({modality:
    (B, ...)}, mask (B, K))`` after ``model.preprocess``, in the order of ``model.obs_dims``
    (:class:`pssm.core.Dimensions`, required), unseen entries zero (``obs`` and ``mask`` as in
    :mod:`pssm.belief`)."""
    require(model, Dimensions, "a guide's belief step")
    return step_observations(_preprocessed(model, obs), mask, list(model.obs_dims))


class GuideNetworks:
    """The networks of an amortised guide, built on first use with concrete initial weights
    (also when first used under ``jit``), and registered under ``name``:

    * ``posterior(in_features, d)``: :class:`pssm.nets.GaussianMLP` at ``"<name>$params"``,
      seeded with ``nnx.Rngs(seed)``;
    * ``embedding(dims)``: a :class:`pssm.layers.ConvEncoder` per image modality at
      ``"<name>_encoder_<modality>$params"`` (vectors need no parameters), and
      ``embedding_size(dims)``, the size ``E`` of its output;
    * ``backward(in_features, size)``: a :class:`pssm.nets.GRU` at ``"<name>_backward$params"``.
    """

    def __init__(self, name, hidden, *, min_var, conv_depth, embed_features, seed):
        self.name, self.min_var, self.seed = name, min_var, seed
        self.widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
        self.conv_depth, self.embed_features = conv_depth, embed_features
        self._cache = {}

    def _build(self, key, make):
        if key not in self._cache:
            with jax.ensure_compile_time_eval():  # concrete initial weights, even under jit
                self._cache[key] = make()
        return self._cache[key]

    def _rngs(self, salt: int) -> nnx.Rngs:
        return nnx.Rngs(jax.random.fold_in(jax.random.key(self.seed), salt))

    def posterior(self, in_features: int, d: int) -> Callable:
        net = self._build(
            ("posterior", in_features, d),
            lambda: GaussianMLP(
                in_features, self.widths, d, min_var=self.min_var, rngs=nnx.Rngs(self.seed)
            ),
        )
        return register(self.name, net)

    def backward(self, in_features: int, size: int) -> Callable:
        net = self._build(
            ("backward", in_features, size), lambda: GRU(in_features, size, rngs=self._rngs(1000))
        )
        return register(f"{self.name}_backward", net)

    def _encoder(self, i: int, k: str, shape) -> ConvEncoder:
        return self._build(
            ("encoder", k, shape),
            lambda: ConvEncoder(
                shape, self.embed_features, depth=self.conv_depth, rngs=self._rngs(1 + i)
            ),
        )

    def embedding_size(self, dims: Mapping) -> int:
        """``E``: the size of :meth:`embedding`'s output for the modalities ``dims``."""
        size = 0
        for i, (k, s) in enumerate(dims.items()):
            if _is_image(s):
                enc = self._encoder(i, k, s)
                size += enc.flat_features if enc.head is None else enc.head.out_features
            else:
                size += math.prod(event_shape(s))
        return size

    def embedding(self, dims: Mapping) -> Callable:
        """``(obs {modality: (..., *shape)}, mask (..., K)) -> (..., E)``: images encoded,
        vectors flattened, each zero where its flag is 0; ``dims`` gives order and shapes."""
        names = list(dims)
        encoders = {
            k: register(f"{self.name}_encoder_{k}", self._encoder(i, k, dims[k]))
            for i, k in enumerate(names)
            if _is_image(dims[k])
        }

        def embed(obs, mask):
            parts = []
            for i, k in enumerate(names):
                o = obs[k]
                n = len(dims[k]) if isinstance(dims[k], tuple) else 1
                lead = jnp.shape(o)[: jnp.ndim(o) - n]
                e = encoders[k](o) if k in encoders else jnp.reshape(o, (*lead, -1))
                e = e.astype(jnp.promote_types(e.dtype, default_param_dtype()))
                parts.append(jnp.where(mask[..., i, None], e, 0.0))
            return jnp.concatenate(parts, axis=-1)

        return embed


def shapes(x: Inputs) -> dict[str, tuple]:
    """``{modality: trailing shape}`` of validated inputs, in their order."""
    return {k: tuple(o.shape[2:]) for k, o in x.obs.items()}


def latent_size(model, latent_dim, obs, actions, mask) -> int:
    """``latent_dim``, else ``model.latent_dim`` (:class:`pssm.core.Dimensions`), else read from
    an abstract trace of the model."""
    d = latent_dim or (model.latent_dim if isinstance(model, Dimensions) else None)
    return int(d or _latent_dim(model, obs, actions, mask))


def step_latent_size(model, latent_dim, guide_name: str) -> int:
    """``latent_dim`` or ``model.latent_dim`` (:class:`pssm.core.Dimensions`), needed to step
    a posterior without data."""
    d = latent_dim or (model.latent_dim if isinstance(model, Dimensions) else None)
    if d is None:
        raise ValueError(f"pass latent_dim= to {guide_name}() to step its posterior network")
    return int(d)


def state_size(model, d: int, action_dim: int) -> int:
    """Size of ``s_t``: ``model.deterministic_size``, or ``d + u`` without a deterministic path
    (:class:`pssm.core.DeterministicPath`)."""
    if isinstance(model, DeterministicPath):
        return int(model.deterministic_size)
    return int(d + action_dim)


def posterior_factor(net: Callable) -> Factor:
    """The factor ``(s_t, seen_t) -> (mu_t, sigma_t^2) = net([s_t, seen_t])`` of every amortised
    guide: ``s_t`` the state (``h_t``), ``seen_t`` what the factor sees of the data."""
    return lambda state, seen: net(jnp.concatenate([state, seen], axis=-1))


def sample_states(model, factor: Factor, seen: jax.Array, actions, d: int) -> jax.Array:
    """Sample ``"z_0"`` ``(B, d)`` and ``"z"`` ``(T-1, B, d)`` from ``N(factor(s_t, seen_t))``.

    ``s_t`` is ``h_t`` recomputed from the samples through ``model.deterministic()`` (with the
    model's MC-dropout site drawn via ``model.dropout_noise``; :class:`pssm.core.
    DeterministicPath`), or
    ``[z_{t-1}, a_{t-1}]`` (zeros at ``t = 0``) for a model without a deterministic path.
    ``seen`` ``(B, T, n)``: what the factor sees of the data at each step. Returns ``(B, T, d)``.
    """
    B, T = seen.shape[:2]
    dtype = seen.dtype
    a = jnp.zeros((B, T, 0), dtype) if actions is None else jnp.asarray(actions)
    has_path = isinstance(model, DeterministicPath)
    noise = None
    if has_path:
        step = model.deterministic()
        state = jnp.zeros((B, model.deterministic_size), dtype)
        drop = model.dropout_noise(B, T)
        noise = None if drop is None else jnp.moveaxis(drop.path[:, 1:], 1, 0)
    else:
        state = jnp.zeros((B, d + a.shape[-1]), dtype)

    with numpyro.plate("batch", B):
        z0 = numpyro.sample("z_0", gaussian(*factor(state, seen[:, 0])))

    def transition(carry, xs):
        state, z = carry
        a_prev, seen_t, n = xs
        if has_path:
            state = step(state, z, a_prev.astype(dtype), noise=n)
        else:
            state = jnp.concatenate([z, a_prev.astype(dtype)], -1)
        with numpyro.plate("batch", B):
            z = numpyro.sample("z", gaussian(*factor(state, seen_t)))
        return (state, z), z

    xs = (jnp.moveaxis(a[:, :-1], 1, 0), jnp.moveaxis(seen[:, 1:], 1, 0), noise)
    if seen.shape[1] > 1:
        _, zs = scan(transition, (state, z0), xs)
    else:  # T = 1: z_0 alone, no site "z" (NumPyro's scan cannot replay a length-0 site)
        zs = jnp.zeros((0, *z0.shape), z0.dtype)
    return jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)


def first_flags(B: int, T: int) -> jax.Array:
    """``1{t = 0}`` ``(B, T)`` (booleans), the flag every amortised factor sees."""
    return jnp.zeros((B, T), bool).at[:, 0].set(True)


# --- the amortised filtering guide ---------------------------------------------------------------


def filtering_factor(networks: GuideNetworks, dims: Mapping, s: int, d: int):
    """Register the filtering guide's networks for the modalities ``dims``, state size ``s`` and
    latent size ``d``; returns ``(seen, factor)``: ``seen(obs, mask (..., K), first (...))``
    ``-> [e_t, m_t, 1{t = 0}]`` on any leading axes and ``factor`` on ``[s_t, seen_t]``."""
    embed = networks.embedding(dims)
    n = networks.embedding_size(dims) + len(dims) + 1
    factor = posterior_factor(networks.posterior(s + n, d))

    def seen(obs, mask, first):
        e = embed(obs, mask)
        return jnp.concatenate([e, mask.astype(e.dtype), first[..., None].astype(e.dtype)], -1)

    return seen, factor


def filtering(
    model,
    *,
    hidden: int | Sequence[int] = 64,
    name: str = "filter_net",
    latent_dim: int | None = None,
    min_var: float = 1e-4,
    conv_depth: int = 32,
    embed_features: int | None = None,
    seed: int = 0,
):
    """Guide: amortised filtering ``prod_t q(z_t | h_t, o_t)`` (the RSSM posterior; equations in
    the module docstring), on vectors and images.

    Args:
        model: an RSSM (:func:`pssm.rssm.rssm`), or any model with the sites ``"z_0"``, ``"z"``
            of :mod:`pssm.core` (then ``s_t = [z_{t-1}, a_{t-1}]``).
        hidden: width(s) of the posterior network's hidden layers.
        name: prefix of the parameter sites (``"<name>$params"``,
            ``"<name>_encoder_<modality>$params"``).
        latent_dim: size of ``z_t``; default ``model.latent_dim``, else read from the ``"z_0"``
            site of an abstract trace of the model.
        min_var: floor of the factors' variances.
        conv_depth, embed_features: channel multiplier of the conv encoders (PlaNet: 32) and
            the size of an optional linear head after them (``None``: the flat conv features).
        seed: initialisation of the networks.

    Returns:
        A NumPyro guide with the model's signature ``(obs, actions=None, mask=None,
        rewards=None)``; it samples ``"z_0"`` ``(B, d)`` and ``"z"`` ``(T-1, B, d)`` (a ``scan``,
        plate inside) and returns the path ``(B, T, d)``. Use it with ``Trace_ELBO`` or
        ``TraceMeanField_ELBO`` (per-step analytic KL to the model's prior factor, the RSSM
        objective). It carries ``guide.belief_posterior()`` (call it under
        ``handlers.substitute`` of the parameters; needs :class:`pssm.core.Dimensions`):
        registers the networks and returns the guide's factor for one step,
        ``(s_t (B, s), obs_t, mask_t, first (B,)) -> (mu, sigma^2)``, ``obs_t`` and ``mask_t``
        as in :mod:`pssm.belief`: what :func:`pssm.rssm.rssm`'s ``belief_step`` takes.
    """
    networks = GuideNetworks(
        name, hidden, min_var=min_var, conv_depth=conv_depth, embed_features=embed_features,
        seed=seed,
    )  # fmt: skip

    def guide(obs, actions=None, mask=None, rewards=None):  # rewards: scored by the model only
        x = guide_inputs(model, obs, actions, mask)
        B, T = x.mask.shape[:2]
        d = latent_size(model, latent_dim, obs, actions, mask)
        u = 0 if x.actions is None else x.actions.shape[-1]
        seen, factor = filtering_factor(networks, shapes(x), state_size(model, d, u), d)
        return sample_states(model, factor, seen(x.obs, x.mask, first_flags(B, T)), x.actions, d)

    def belief_posterior():
        require(model, Dimensions, "filtering's belief_posterior")
        d = step_latent_size(model, latent_dim, "filtering")
        s = state_size(model, d, model.action_dim)
        seen, factor = filtering_factor(networks, model.obs_dims, s, d)

        def posterior(state, obs, mask, first):
            """``(mu_t, sigma_t^2)`` of ``q(z_t | s_t, o_t, m_t, 1{t = 0})``."""
            o, m = step_inputs(model, obs, mask)
            return factor(state, seen(o, m, jnp.asarray(first)))

        return posterior

    guide.belief_posterior = belief_posterior
    return guide


def _latent_dim(model, obs, actions, mask) -> int:
    """Size of ``z_t`` from the ``"z_0"`` site of an abstract (shape-only) trace of ``model``."""

    def z0(obs, actions, mask):
        with numpyro.handlers.block():
            tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(
                obs, actions, mask
            )
        return tr["z_0"]["value"]

    return jax.eval_shape(z0, obs, actions, mask).shape[-1]
