"""Amortised filtering guide for the RSSM on any modalities (vectors and images):

    e_t = [emb_1(o_t^(1)) m_t^1, ..., emb_K(o_t^(K)) m_t^K]    embeddings, 0 where missing
    h_0 = 0,   h_t = f(h_{t-1}, z_{t-1}, a_{t-1})                 the model's deterministic path
    q(z_t | z_{<t}, o_{<=t}) = N(mu, diag(sigma^2)),   (mu, sigma^2) = net([h_t, e_t, m_t, 1{t=0}])

``emb_k`` is the PlaNet/Dreamer conv encoder (:class:`pssm.layers.ConvEncoder`, four stride-2
convolutions, 1024 features for 64x64 images) for an image modality ``(H, W, C)`` and the
identity (flattened) for a vector: the RSSM posterior ``q(z_t | h_t, o_t)`` of Hafner et al.
(2019, "Learning Latent Dynamics for Planning from Pixels", Fig. 2c; the encoder lives in the
guide, the inference network). On vector modalities it *is*
:func:`inference.guides.filtering` (same sites, same initial weights, the same numbers).

For a model without a deterministic path the state is ``[z_{t-1}, a_{t-1}]`` instead of ``h_t``
(as in :func:`inference.guides.filtering`). A model with MC dropout (``model.dropout_noise``,
:func:`pssm.rssm.rssm`) has its dropout site drawn here and replayed by the model, so both
compute ``h`` with the same masks.

The pieces shared with the smoothing guide (:mod:`inference.guides.smoothing_rssm`) live here:
:func:`guide_inputs` (validation and image preprocessing as the model does it),
:class:`GuideNetworks` (lazily built networks with concrete initial weights) and
:func:`sample_states` (the recursion over ``h_t`` and the sites ``"z_0"``, ``"z"``).
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpyro
from flax import nnx
from numpyro.contrib.control_flow import scan

from pssm.core import gaussian
from pssm.layers import ConvEncoder
from pssm.locally_linear import Inputs, prepare_inputs
from pssm.nets import GRU, GaussianMLP, default_param_dtype, register

from .filtering import _latent_dim


def _is_image(shape) -> bool:
    return isinstance(shape, tuple) and len(shape) == 3


def guide_inputs(model, obs, actions=None, mask=None) -> Inputs:
    """Validated inputs as the model sees them: ``model.preprocess`` (integer images to floats)
    if the model has it, modalities in the order of ``model.obs_dims`` (else of the data), masked
    entries zero. Models without ``obs_dims`` / ``action_dim`` have them read from the data."""
    preprocess = getattr(model, "preprocess", None)
    obs = obs if preprocess is None else preprocess(obs)
    dims = getattr(model, "obs_dims", None)
    if dims is None:
        if isinstance(obs, Mapping):
            dims = {k: tuple(jnp.shape(o)[2:]) for k, o in obs.items()}
        else:
            dims = tuple(jnp.shape(obs)[2:])
    elif not isinstance(obs, Mapping) and list(dims) == ["obs"]:
        dims = dims["obs"]
    u = getattr(model, "action_dim", None)
    if u is None:
        u = 0 if actions is None else jnp.shape(actions)[-1]
    return prepare_inputs(dims, u, obs, actions, mask)


class GuideNetworks:
    """The networks of an RSSM guide, built on first use with concrete initial weights (also
    when first used under ``jit``), and registered under ``name``:

    * ``posterior(in_features, d)``: :class:`pssm.nets.GaussianMLP` at ``"<name>$params"``,
      seeded with ``nnx.Rngs(seed)`` (as :func:`inference.guides.filtering`);
    * ``embedding(dims)``: a :class:`pssm.layers.ConvEncoder` per image modality at
      ``"<name>_encoder_<modality>$params"`` (vectors need no parameters);
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

    def embedding(self, dims: Mapping[str, tuple]) -> Callable:
        """``(obs {modality: (..., *shape)}, mask (..., K)) -> (..., E)``: images encoded,
        vectors flattened, each zero where its flag is 0; ``dims`` gives order and shapes."""
        names = list(dims)
        encoders = {}
        for i, k in enumerate(names):
            if _is_image(dims[k]):
                enc = self._build(
                    ("encoder", k, dims[k]),
                    lambda s=dims[k], i=i: ConvEncoder(
                        s, self.embed_features, depth=self.conv_depth, rngs=self._rngs(1 + i)
                    ),
                )
                encoders[k] = register(f"{self.name}_encoder_{k}", enc)

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
    """``latent_dim``, else ``model.latent_dim``, else read from an abstract trace of the model."""
    d = latent_dim or getattr(model, "latent_dim", None)
    return int(d or _latent_dim(model, obs, actions, mask))


def sample_states(model, net: Callable, seen: jax.Array, actions, d: int) -> jax.Array:
    """Sample ``"z_0"`` ``(B, d)`` and ``"z"`` ``(T-1, B, d)`` from ``N(net([s_t, seen_t]))``.

    ``s_t`` is ``h_t`` recomputed from the samples through ``model.deterministic()`` (with the
    model's MC-dropout site drawn via ``model.dropout_noise`` when it has one), or
    ``[z_{t-1}, a_{t-1}]`` (zeros at ``t = 0``) for a model without a deterministic path.
    ``seen`` ``(B, T, n)``: what the factor sees of the data at each step. Returns ``(B, T, d)``.
    """
    B, T = seen.shape[:2]
    dtype = seen.dtype
    a = jnp.zeros((B, T, 0), dtype) if actions is None else jnp.asarray(actions)
    has_path = hasattr(model, "deterministic")
    noise = None
    if has_path:
        step = model.deterministic()
        state = jnp.zeros((B, model.deterministic_size), dtype)
        dropout_noise = getattr(model, "dropout_noise", None)
        drop = None if dropout_noise is None else dropout_noise(B, T)
        noise = None if drop is None else jnp.moveaxis(drop.path[:, 1:], 1, 0)
    else:
        state = jnp.zeros((B, d + a.shape[-1]), dtype)

    def factor(state, seen_t):
        return gaussian(*net(jnp.concatenate([state, seen_t], axis=-1)))

    with numpyro.plate("batch", B):
        z0 = numpyro.sample("z_0", factor(state, seen[:, 0]))

    def transition(carry, xs):
        state, z = carry
        a_prev, seen_t, n = xs
        if has_path:
            state = step(state, z, a_prev.astype(dtype), noise=n)
        else:
            state = jnp.concatenate([z, a_prev.astype(dtype)], -1)
        with numpyro.plate("batch", B):
            z = numpyro.sample("z", factor(state, seen_t))
        return (state, z), z

    xs = (jnp.moveaxis(a[:, :-1], 1, 0), jnp.moveaxis(seen[:, 1:], 1, 0), noise)
    if seen.shape[1] > 1:
        _, zs = scan(transition, (state, z0), xs)
    else:  # T = 1: z_0 alone, no site "z" (NumPyro's scan cannot replay a length-0 site)
        zs = jnp.zeros((0, *z0.shape), z0.dtype)
    return jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)


def state_size(model, d: int, action_dim: int) -> int:
    """Size of ``s_t``: ``model.deterministic_size``, or ``d + u`` without a deterministic path."""
    if hasattr(model, "deterministic"):
        return int(model.deterministic_size)
    return int(d + action_dim)


def rssm_filtering(
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
    """Guide: amortised filtering ``prod_t q(z_t | h_t, o_t)`` with per-modality embeddings.

    Args:
        model: an RSSM (:func:`pssm.rssm.rssm`), or any model with the sites ``"z_0"``, ``"z"``
            of :mod:`pssm.core` (then on vector observations).
        hidden: width(s) of the posterior network's hidden layers.
        name: prefix of the parameter sites (``"<name>$params"``,
            ``"<name>_encoder_<modality>$params"``).
        latent_dim: size of ``z_t`` (default ``model.latent_dim`` or read from the model).
        min_var: floor of the factors' variances.
        conv_depth, embed_features: channel multiplier of the conv encoders (PlaNet: 32) and
            the size of an optional linear head after them (``None``: the flat conv features).
        seed: initialisation of the networks.

    Returns:
        A NumPyro guide ``(obs, actions=None, mask=None, rewards=None)`` sampling ``"z_0"``
        ``(B, d)`` and ``"z"`` ``(T-1, B, d)``, returning the path ``(B, T, d)``, and carrying
        the stepwise pieces for agents (call under ``handlers.substitute`` of the parameters):
        ``guide.embedding(dims)`` (see :class:`GuideNetworks`) and
        ``guide.posterior(in_features)``, the factor network on ``[s_t, e_t, m_t, 1{t = 0}]``.
    """
    networks = GuideNetworks(
        name, hidden, min_var=min_var, conv_depth=conv_depth, embed_features=embed_features,
        seed=seed,
    )  # fmt: skip

    def guide(obs, actions=None, mask=None, rewards=None):  # rewards: scored by the model only
        x = guide_inputs(model, obs, actions, mask)
        B, T = x.mask.shape[:2]
        d = latent_size(model, latent_dim, obs, actions, mask)
        e = networks.embedding(shapes(x))(x.obs, x.mask)
        flag = jnp.zeros((B, T, 1), e.dtype).at[:, 0].set(1.0)
        seen = jnp.concatenate([e, x.mask.astype(e.dtype), flag], axis=-1)
        u = 0 if x.actions is None else x.actions.shape[-1]
        net = networks.posterior(state_size(model, d, u) + seen.shape[-1], d)
        return sample_states(model, net, seen, x.actions, d)

    def posterior(in_features: int):
        """The factor network ``x_t -> (mu_t, sigma_t^2)`` (its site registered) on
        ``x_t = [s_t, e_t, m_t, 1{t = 0}]`` with ``in_features`` entries in all."""
        d = latent_dim or getattr(model, "latent_dim", None)
        if d is None:
            raise ValueError("pass latent_dim= to rssm_filtering() to step its posterior network")
        return networks.posterior(int(in_features), int(d))

    guide.embedding, guide.posterior = networks.embedding, posterior
    return guide
