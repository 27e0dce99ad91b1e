"""KalMamba: a latent linear-Gaussian SSM whose dynamics a Mamba backbone computes, with
time-parallel Kalman filtering and smoothing (Becker, Freymuth & Neumann 2024, "KalMamba:
Towards Efficient Probabilistic State Space Models for RL under Uncertainty").

For ``K`` modalities ``o_t^(k)`` (vectors, or images ``(H, W, C)``: ``uint8``, or floats in
``[-0.5, 0.5]``, see :func:`pssm.layers.preprocess_image`), latent ``z_t`` of size ``d``,
actions ``a_t``:

    encoders     w_t^(k), r_t^(k) = enc_k(o_t^(k))                    latent observation, variance
    fused        wbar_t = sum_k m_t^k w_t^(k) / r_t^(k) / sum_k m_t^k / r_t^(k)    (0 if none)
    backbone     m_t = W Mamba(pre([wbar_t, a_{t-1}, m_t^{1..K}]))    a_{-1} = 0   (App. C, Fig. 4)
    dynamics     A_t, b_t, Q_t = dyn([m_t, a_t])                      A_t in [0.1, 0.99] (0.9 at 0),
                                                                      Q_t in [1e-3, 0.1] (0.01 at 0)
    prior        z_0 ~ N(0, diag(P_0)),  z_{t+1} ~ N(A_t * z_t + b_t, diag(Q_t))   (Eq. 1)
    likelihood   o_t^(k) ~ N(dec_k(z_t), sigma_k^2)     unless masked (m_t^k = 0)
    rewards      r_t ~ N(rew(z_{t+1}), 1)               t < T - 1, when ``rewards`` are given

with the latent emissions ``w_t^(k) = z_t + N(0, diag(r_t^(k)))`` that the Kalman guides condition
on (``model.structure``; several sensors fuse in information form, a masked one is skipped).
``m_t`` sees exactly what the filtered belief ``q(z_t | o_{<=t}, a_{<t})`` sees; the Mahalanobis
regulariser (App. C, Eq. 2)

    R = sum_t (m_t - mu_t^+)^T (Sigma_t^+)^{-1} (m_t - mu_t^+)

pulls it towards the filtered mean, so the dynamics are linearised around (an estimate of) the
filtered mean, as in an extended Kalman filter, without making the filter recurrent. The
objective (Sec. 2) is the VRKN smoothing bound (``inference.guides.kalman_smoothing`` under
``TraceMeanField_ELBO``) plus the reward term minus ``alpha R``: :class:`KalMambaELBO`.

The small networks before and after the Mamba (``pre`` and ``dyn``, SiLU) carry Monte-Carlo
dropout (Gal & Ghahramani 2016; :class:`pssm.layers.MCDropout`), active only when a
``dropout_key`` is passed to the model / structure (a model argument, so that the model and the
Kalman guide of one ELBO evaluation see the *same* dynamics; :class:`KalMambaELBO` draws it).
The Mamba (:mod:`pssm.mamba`) and the Kalman filter and smoother all run as associative scans,
so the whole forward pass is time-parallel (``parallel=True``; ``False`` runs ``lax.scan`` with
the same numbers).

Conventions of :mod:`pssm.core`: ``a_t`` drives ``z_t -> z_{t+1}``; sites ``"z_0"``, ``"z"``,
``"obs"`` / ``"obs_<name>"``, ``"reward"``. The paper's sizes are the defaults (latent 230,
256-unit networks, 2 Mamba blocks with ``d_model`` 256, ``d_state`` 64, ``d_conv`` 2, dropout 0.1).
"""

from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from flax import nnx
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import TraceMeanField_ELBO
from numpyro.infer.elbo import ELBO

from inference import kalman

from . import nets
from .core import Structure, linear_gaussian, model_prior_conditionals, sample_latent_path
from .layers import ConvDecoder, GaussianConvEncoder, MCDropout, preprocess_image
from .locally_linear import (
    Inputs,
    fuse,
    gaussian_observations,
    latent_emissions,
    modalities,
    observation_sites,
    observed_size,
    partial_observation,
    prepare_inputs,
)
from .mamba import Mamba, MambaState
from .rssm import score_rewards


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


class DropoutMLP(nnx.Module):
    """``x -> drop(act(W_L ... drop(act(W_1 x)) ...))``: MC dropout
    (:class:`pssm.layers.MCDropout`) after every activation, one key per layer split from the
    call's ``key`` (``None``: no dropout). Output size ``widths[-1]``."""

    def __init__(self, in_features, widths, *, rate, activation=nnx.silu, param_dtype=None, rngs):
        dtype = param_dtype or nets.default_param_dtype()
        sizes = [in_features, *widths]
        self.num_layers = len(widths)
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            setattr(self, f"layer{i}", nnx.Linear(n_in, n_out, param_dtype=dtype, rngs=rngs))
        self.dropout, self.activation, self.out_features = MCDropout(rate), activation, sizes[-1]

    def __call__(self, x, key=None):
        for i, k in enumerate(_keys(key, self.num_layers)):
            x = self.dropout(self.activation(getattr(self, f"layer{i}")(x)), k)
        return x


class Backbone(nnx.Module):
    """``[wbar_t, a_{t-1}, mask_t] -> m_t``: dropout MLP (width ``d_model``), a :class:`Mamba`
    stack, a linear map to the latent size (App. C, Fig. 4). Recurrent: takes and returns the
    Mamba's state (``return_states``: the state after every step)."""

    def __init__(
        self, in_features, latent_dim, *, d_model, pre_layers, rate, param_dtype=None, rngs,
        **mamba,
    ):  # fmt: skip
        dtype = param_dtype or nets.default_param_dtype()
        self.pre = DropoutMLP(
            in_features, [d_model] * pre_layers, rate=rate, param_dtype=dtype, rngs=rngs
        )
        self.mamba = Mamba(d_model, param_dtype=dtype, rngs=rngs, **mamba)
        self.out = nnx.Linear(d_model, latent_dim, param_dtype=dtype, rngs=rngs)

    def init_state(self, batch_shape=(), dtype=None) -> tuple[MambaState, ...]:
        return self.mamba.init_state(batch_shape, dtype)

    def __call__(self, x, state=None, *, key=None, parallel=True, return_states=False):
        y, state = self.mamba(
            self.pre(x, key), state, parallel=parallel, return_states=return_states
        )
        return self.out(y), state


class Dynamics(nnx.Module):
    """``[m_t, a_t] -> (A_t, b_t, Q_t)``: a dropout MLP (SiLU), then VRKN's heads as in
    :class:`pssm.nets.DiagonalTransition`: ``A`` and ``Q`` squashed by
    :class:`pssm.nets.Bounded`, ``b`` linear."""

    def __init__(self, in_features, latent_dim, widths, *, rate, A_bounds, Q_bounds, rngs):
        dtype = nets.default_param_dtype()
        self.trunk = DropoutMLP(in_features, widths, rate=rate, rngs=rngs)
        n = self.trunk.out_features
        self.A = nets.Bounded(n, latent_dim, *A_bounds, rngs=rngs)
        self.b = nnx.Linear(n, latent_dim, param_dtype=dtype, rngs=rngs)
        self.Q = nets.Bounded(n, latent_dim, *Q_bounds, rngs=rngs)

    def __call__(self, x, key=None):
        h = self.trunk(x, key)
        return self.A(h), self.b(h), self.Q(h)


class Forward(NamedTuple):
    """One pass of the inference side: the latent LGSSM, the backbone outputs ``m`` ``(B, T, d)``
    and the Mamba states (after the last step, or after every step)."""

    structure: Structure
    m: jax.Array
    mamba_state: tuple[MambaState, ...]


class Networks(NamedTuple):
    """The inference side's networks as pure functions (parameters registered) and ``P_0``."""

    encoders: dict
    backbone: object
    dynamics: object
    P0: jax.Array


def backbone_inputs(wbar, a_prev, mask) -> jax.Array:
    """``[wbar_t, a_{t-1}, mask_t]`` (``a_prev`` may be ``None``: no actions)."""
    parts = [wbar] + ([] if a_prev is None else [a_prev]) + [mask.astype(wbar.dtype)]
    return jnp.concatenate(parts, axis=-1)


def mahalanobis(m: jax.Array, filtered: kalman.Gaussian) -> jax.Array:
    """``sum_t (m_t - mu_t^+)^T (Sigma_t^+)^{-1} (m_t - mu_t^+)`` over the time axis ``-2``
    (diagonal ``Sigma^+``; App. C, Eq. 2)."""
    return jnp.sum((m - filtered.mean) ** 2 / filtered.cov, axis=(-2, -1))


def kalmamba(
    obs_dims: int | tuple | Mapping[str, int | tuple],
    latent_dim: int = 230,
    action_dim: int = 0,
    hidden: int | Sequence[int] = (256, 256),
    *,
    d_model: int = 256,
    pre_layers: int = 2,
    num_blocks: int = 2,
    d_state: int = 64,
    d_conv: int = 2,
    expand: int = 2,
    dropout: float = 0.1,
    reward: bool = False,
    parallel: bool = True,
    obs_var: float = 1.0,
    learn_obs_var: bool = False,
    min_obs_var: float = 0.01,
    min_latent_obs_var: float = 1e-3,
    A_bounds: tuple[float, float, float] = (0.1, 0.99, 0.9),
    Q_bounds: tuple[float, float, float] = (1e-3, 0.1, 1e-2),
    conv_depth: int = 32,
    image_bits: int = 5,
    observed_dim: int | None = None,
    name: str = "kalmamba",
    seed: int = 0,
):
    """Build KalMamba (equations in the module docstring; paper sizes by default).

    Args:
        obs_dims: one modality's shape (``p`` or ``(H, W, C)``), or ``{modality: shape}``.
            Vector modalities get ELU MLP encoders/decoders of widths ``hidden``, images the
            PlaNet/Dreamer conv stacks of :mod:`pssm.layers` (depth ``conv_depth``). Integer
            images are mapped to ``[-0.5, 0.5]`` at ``image_bits`` colour depth
            (:func:`pssm.layers.preprocess_image`; 5 as VRKN), float ones taken as mapped.
        latent_dim: ``d``, the size of ``z_t``, ``w_t`` and ``m_t``.
        action_dim: ``u`` (``0``: no actions).
        hidden: widths of the encoders', decoders', reward head's and dynamics' hidden layers.
        d_model, pre_layers: the backbone's width and its number of SiLU layers before the Mamba.
        num_blocks, d_state, d_conv, expand: the Mamba stack (:class:`pssm.mamba.Mamba`).
        dropout: MC-dropout rate of the pre- and post-Mamba networks (active with a key only).
        reward: build the reward head (scored when the model is given ``rewards``).
        parallel: associative scans in the Mamba (and in :meth:`regulariser`'s filter).
        obs_var, learn_obs_var, min_obs_var: decoder variances (fixed, as the paper, or learned).
        min_latent_obs_var: floor of the encoders' variances ``r_t^(k)``.
        A_bounds, Q_bounds: ``(lo, hi, value at zero)`` of the transition entries and variances.
        observed_dim: ``m``, how many latent coordinates the latent observations cover
            (``None``: all, ``H = I`` as the paper). With ``m < d`` the encoders emit ``m``
            coordinates and the others are never observed (RKN's ``H = [I_m, 0]``,
            :func:`pssm.locally_linear.partial_observation`): they enter the backbone as 0
            and are filled by the dynamics' offset ``b_t(m_t, a_t)`` alone.
        name: prefix of every parameter site.
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None, rewards=None, dropout_key=None)`` with latent sites
        ``"z_0"``, ``"z"``, carrying ``model.structure`` (for Kalman guides), ``model.forward``
        (:class:`Forward` of prepared inputs), ``model.regulariser`` (``R`` per sequence),
        ``model.networks()`` / ``model.reward()`` / ``model.decoders()`` (register parameters,
        return pure functions), ``model.prepare`` (checked :class:`Inputs`),
        ``model.preprocess`` (images to floats) and the sizes ``latent_dim``, ``action_dim``,
        ``obs_dims``, ``parallel``.
    """
    dims = modalities(obs_dims)
    d, u, K = int(latent_dim), int(action_dim), len(dims)
    observed = observed_size(observed_dim, d)
    widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    rngs = nnx.Rngs(seed)
    image = {k: not isinstance(s, int) for k, s in dims.items()}
    for k, s in dims.items():
        if image[k] and len(s) != 3:
            raise ValueError(f"modality {k!r}: shape {s} is neither a vector nor (H, W, C)")
    conv = dict(depth=conv_depth, rngs=rngs)
    encoders = {
        k: GaussianConvEncoder(s, observed, min_var=min_latent_obs_var, **conv)
        if image[k]
        else nets.GaussianMLP(s, widths, observed, min_var=min_latent_obs_var, rngs=rngs)
        for k, s in dims.items()
    }
    mamba_kw = dict(num_blocks=num_blocks, d_state=d_state, d_conv=d_conv, expand=expand)
    backbone = Backbone(
        d + u + K, d, d_model=d_model, pre_layers=pre_layers, rate=dropout, rngs=rngs, **mamba_kw
    )
    dynamics = Dynamics(
        d + u, d, widths, rate=dropout, A_bounds=A_bounds, Q_bounds=Q_bounds, rngs=rngs
    )
    decoders = {
        k: ConvDecoder(d, s, **conv) if image[k] else nets.MLP(d, widths, s, rngs=rngs)
        for k, s in dims.items()
    }
    reward_head = nets.MLP(d, widths, 1, rngs=rngs) if reward else None
    sites = observation_sites(obs_dims)
    dtype = nets.default_param_dtype()

    def networks() -> Networks:
        reg = lambda part, net: nets.register(f"{name}_{part}", net)
        P0 = numpyro.param(f"{name}_P0", jnp.ones(d, dtype), constraint=constraints.positive)
        return Networks(
            {k: partial_observation(reg(f"encoder_{k}", e), d) for k, e in encoders.items()},
            reg("backbone", backbone),
            reg("dynamics", dynamics),
            P0,
        )

    def forward(x: Inputs, dropout_key=None, *, return_states=False) -> Forward:
        n = networks()
        w, R = zip(*(n.encoders[k](o) for k, o in x.obs.items()), strict=True)
        w, R = jnp.stack(w, axis=2), jnp.stack(R, axis=2)  # (B, T, K, d)
        B, T = w.shape[:2]
        a_prev = None
        if u:
            a_prev = jnp.concatenate([jnp.zeros_like(x.actions[:, :1]), x.actions[:, :-1]], 1)
        k_pre, k_dyn = _keys(dropout_key, 2)
        m, state = n.backbone(
            backbone_inputs(fuse(w, R, x.mask), a_prev, x.mask),
            key=k_pre, parallel=parallel, return_states=return_states,
        )  # fmt: skip
        dyn_in = m[:, :-1] if not u else jnp.concatenate([m[:, :-1], x.actions[:, :-1]], -1)
        A, b, Q = n.dynamics(dyn_in, k_dyn)
        prior = kalman.Gaussian(jnp.zeros((B, d), dtype), jnp.broadcast_to(n.P0, (B, d)))
        emissions = (
            latent_emissions(w, R, x.mask) if observed < d else kalman.Emissions(w, R, x.mask)
        )
        s = Structure(prior, kalman.Dynamics(A, b, Q), emissions)
        return Forward(s, m, state)

    def preprocess(obs):
        """Integer images -> floats in ``[-0.5, 0.5]``; everything else unchanged."""

        def one(k, o):
            o = jnp.asarray(o)
            if image[k] and jnp.issubdtype(o.dtype, jnp.integer):
                return preprocess_image(o, image_bits)
            return o

        if isinstance(obs, Mapping):
            return {k: one(k, o) if k in dims else o for k, o in obs.items()}
        return one(next(iter(dims)), obs)

    def prepare(obs, actions=None, mask=None) -> Inputs:
        return prepare_inputs(obs_dims, u, preprocess(obs), actions, mask)

    def structure(obs, actions=None, mask=None, rewards=None, dropout_key=None) -> Structure:
        return forward(prepare(obs, actions, mask), dropout_key).structure

    def regulariser(obs, actions=None, mask=None, rewards=None, dropout_key=None, *, detach=True):
        """``R`` per sequence ``(B,)`` (Eq. 2) of one forward pass; ``detach`` stops its
        gradient into the filtered moments (only ``m`` is pulled)."""
        f = forward(prepare(obs, actions, mask), dropout_key)
        filt = jax.vmap(partial(kalman.filter, parallel=parallel))(*f.structure).filtered
        if detach:
            filt = jax.lax.stop_gradient(filt)
        return mahalanobis(f.m, filt)

    @linear_gaussian(structure)
    def model(obs, actions=None, mask=None, rewards=None, dropout_key=None):
        x = prepare(obs, actions, mask)
        if rewards is not None:  # fail before any work
            _require_reward()
            if jnp.shape(rewards) != x.mask.shape[:2]:
                raise ValueError(f"rewards has shape {jnp.shape(rewards)}, expected (B, T)")
        z = sample_latent_path(*model_prior_conditionals(forward(x, dropout_key).structure))
        means = {k: fn(z) for k, fn in decoder_fns().items()}
        gaussian_observations(
            x, means, sites, prefix=name, obs_var=obs_var, learn_obs_var=learn_obs_var,
            min_obs_var=min_obs_var,
        )  # fmt: skip
        if rewards is not None:
            score_rewards(rewards, z, nets.register(f"{name}_reward", _require_reward()))
        return z

    def _require_reward():
        if reward_head is None:
            raise ValueError("this KalMamba was built without a reward head (reward=True)")
        return reward_head

    def reward_fn():
        """Register the reward head; returns ``z (..., d) -> (...)``."""
        head = nets.register(f"{name}_reward", _require_reward())
        return lambda f: head(f)[..., 0]

    def decoder_fns():
        """Register the decoders; returns ``{modality: z (..., d) -> mean}``."""
        return {k: nets.register(f"{name}_decoder_{k}", dec) for k, dec in decoders.items()}

    model.forward, model.prepare, model.regulariser = forward, prepare, regulariser
    model.preprocess = preprocess
    model.networks, model.reward, model.decoders = networks, reward_fn, decoder_fns
    model.backbone_module = backbone
    model.latent_dim, model.action_dim, model.obs_dims = d, u, dims
    model.parallel, model.feature_size, model.observed_dim = parallel, d, observed
    return model


class KalMambaELBO(ELBO):
    """``-(ELBO) + alpha R``: KalMamba's objective (Sec. 2; Eq. 2) around any NumPyro ELBO (or
    :class:`inference.training.MetricsELBO` wrapper such as free nats).

    For one loss evaluation it draws one dropout key (``mc_dropout=True``) and hands it to model
    and guide as ``dropout_key`` (so the smoothing guide and the prior use the same MC-dropout
    dynamics), then adds ``alpha`` times the Mahalanobis regulariser of the same forward pass,
    summed over the batch, as the NumPyro ELBO sums its terms. With ``detach_filter`` (default;
    the paper leaves this open) the regulariser moves ``m_t`` only, not the filtered belief.

    Metrics: ``"elbo"`` (of the inner ELBO), ``"mahalanobis"`` (``R`` summed over the batch),
    plus the inner wrapper's. Implements :class:`inference.training.MetricsELBO` and NumPyro's
    ``loss_with_mutable_state`` (usable with ``numpyro.infer.SVI``).
    """

    def __init__(
        self, elbo=None, *, alpha: float = 1.0, mc_dropout: bool = True, detach_filter=True
    ):
        self.elbo = TraceMeanField_ELBO() if elbo is None else elbo
        super().__init__(num_particles=getattr(self.elbo, "num_particles", 1))
        self.alpha, self.mc_dropout, self.detach_filter = float(alpha), mc_dropout, detach_filter
        if hasattr(self.elbo, "init_aux"):  # forward the inner wrapper's own state
            self.init_aux = self.elbo.init_aux
            if hasattr(self.elbo, "update_aux"):
                self.update_aux = self.elbo.update_aux

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        if not hasattr(model, "regulariser"):
            raise TypeError("KalMambaELBO needs a KalMamba model (with `model.regulariser`)")
        k_elbo, k_drop = jax.random.split(rng_key)
        if self.mc_dropout:
            kwargs = {**kwargs, "dropout_key": k_drop}
        if hasattr(self.elbo, "loss_with_metrics"):
            out = self.elbo.loss_with_metrics(k_elbo, param_map, model, guide, *args, **kwargs)
            metrics = dict(out["metrics"])
        else:
            out = self.elbo.loss_with_mutable_state(
                k_elbo, param_map, model, guide, *args, **kwargs
            )
            metrics = {}
        kwargs.pop("aux", None)
        with handlers.block(), handlers.substitute(data=param_map):
            R = jnp.sum(model.regulariser(*args, detach=self.detach_filter, **kwargs))
        metrics.setdefault("elbo", -out["loss"])
        metrics["mahalanobis"] = R
        return {
            "loss": out["loss"] + self.alpha * R,
            "metrics": metrics,
            "mutable_state": out.get("mutable_state"),
        }

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        out = self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)
        return {"loss": out["loss"], "mutable_state": out["mutable_state"]}
