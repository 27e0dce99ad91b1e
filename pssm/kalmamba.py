"""KalMamba: a latent linear-Gaussian SSM whose dynamics a Mamba backbone computes, with
time-parallel Kalman filtering and smoothing (Becker, Freymuth & Neumann 2024, "KalMamba:
Towards Efficient Probabilistic State Space Models for RL under Uncertainty").

For ``K`` modalities ``o_t^(k)`` (vectors, or images ``(H, W, C)``: ``uint8``, or floats in
``[-0.5, 0.5]``, see :func:`pssm.layers.preprocess_image`), latent ``z_t`` of size ``d``,
actions ``a_t``:

    encoders     w_t^(k), r_t^(k) = enc_k(o_t^(k))                    latent observation, variance
    fused        wbar_t = sum_k m_t^k w_t^(k) / r_t^(k) / sum_k m_t^k / r_t^(k)    (0 if none)
    backbone     m_t = W Mamba(pre([wbar_t, a_{t-1}, m_t^{1..K}]))    a_{-1} = 0   (App. C, Fig. 4)
    dynamics     A_t, b_t, Q_t = dyn(m_t, a_t)                        A_t in [0.1, 0.99] (0.9 at 0),
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
``TraceMeanField_ELBO``) plus the reward term minus ``alpha R``:
:class:`inference.objectives.KalMambaELBO` (training lives in :mod:`inference`).

The network after the Mamba, ``dyn``, is VRKN's dynamics model (:class:`pssm.nets.VRKNTransition`,
the very network :mod:`pssm.vrkn` uses; KalMamba paper, Table 2: "post mamba layers: VRKN
dynamics model ... with SiLU"), its GRU's hidden state ``m_t`` where VRKN's is the filtered mean:

    x = drop(silu(W_1 [m_t, a_t] + c_1)),  g = drop(GRU(h=m_t, x)),  y = drop(silu(W_2 g + c_2)),
    (A~, Q~, b_t) = W_3 y + c_3,   A_t = sigmoid-bounded(A~),   Q_t = sigmoid-bounded(Q~)

(``W_3, c_3`` start at zero: ``A = 0.9, b = 0, Q = 0.01`` at initialisation, as VRKN). It and
the network before the Mamba (``pre``, SiLU, :class:`pssm.nets.MLP` with ``dropout``) carry
Monte-Carlo dropout (Gal & Ghahramani 2016; :class:`pssm.layers.MCDropout`), with the convention
of :mod:`pssm.vrkn` and :mod:`pssm.rssm`: the masks are a latent site ``"<name>_dropout"``
``(B, T, n_pre + n_dyn)`` ~ ``U(0, 1)`` (keep where ``u >= rate``; per step the ``pre`` layers'
noise, then the ``dyn`` layers', ``n_dyn = 2 dynamics_hidden + d``; the last step's ``dyn``
part drives no transition and is unused), drawn in the forward pass (so in ``structure``): the
Kalman guide (which calls ``structure``) draws it and the model replays the guide's draw, so
both see the *same* dynamics in one ELBO evaluation, and the site adds exactly 0 to the ELBO
(``q = p``). Under ``Predictive`` without a guide the masks are fresh draws. The site is drawn
only under a ``seed`` handler and with ``mc_dropout``; otherwise the networks run without
dropout.
The Mamba (:mod:`pssm.mamba`) and the Kalman filter and smoother all run as associative scans,
so the whole forward pass is time-parallel (``parallel=True``; ``False`` runs ``lax.scan`` with
the same numbers).

Acting (``model.belief_step()``, :mod:`pssm.belief`): the belief is :class:`KalMambaBelief`,
the Gaussian over ``z_t`` plus the Mamba's recurrence around step ``t``. ``condition`` is
:func:`inference.kalman.update` on the encoders' ``w_t, r_t`` and one backbone step on
``[wbar_t, a_{t-1}, m_t^{1..K}]``; ``predict`` is ``dyn(m_t, a_t)`` and
:func:`inference.kalman.predict`, then a tentative backbone step fed the predicted mean (see
:class:`KalMambaBelief`); ``filter`` is the program's time-parallel forward pass and
:func:`inference.kalman.filter`. Encoders, ``fuse``, :func:`backbone_inputs`, the dynamics
network and the prior are the very functions the program's forward pass calls.

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
from numpyro.distributions import constraints

from inference import kalman

from . import nets
from .belief import BeliefStep
from .core import Structure, linear_gaussian, model_prior_conditionals, sample_latent_path
from .inputs import (
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
from .layers import ConvDecoder, GaussianConvEncoder, MCDropout, preprocess_image
from .mamba import Mamba, MambaState
from .observations import step_observations
from .rssm import score_rewards


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _dropout_mlp(in_features, widths, *, rate, param_dtype=None, rngs) -> nets.MLP:
    """``x -> drop(silu(W_L ... drop(silu(W_1 x)) ...))``: :class:`pssm.nets.MLP` without an
    output layer, MC dropout after every activation (masks from a key or uniform noise)."""
    return nets.MLP(
        in_features, widths, activation=nnx.silu, dropout=rate, param_dtype=param_dtype, rngs=rngs
    )


class Backbone(nnx.Module):
    """``[wbar_t, a_{t-1}, mask_t] -> m_t``: dropout MLP (width ``d_model``), a :class:`Mamba`
    stack, a linear map to the latent size (App. C, Fig. 4). Recurrent: takes and returns the
    Mamba's state (``return_states``: the state after every step)."""

    def __init__(
        self, in_features, latent_dim, *, d_model, pre_layers, rate, param_dtype=None, rngs,
        **mamba,
    ):  # fmt: skip
        dtype = param_dtype or nets.default_param_dtype()
        self.pre = _dropout_mlp(
            in_features, [d_model] * pre_layers, rate=rate, param_dtype=dtype, rngs=rngs
        )
        self.mamba = Mamba(d_model, param_dtype=dtype, rngs=rngs, **mamba)
        self.out = nnx.Linear(d_model, latent_dim, param_dtype=dtype, rngs=rngs)

    def init_state(self, batch_shape=(), dtype=None) -> tuple[MambaState, ...]:
        return self.mamba.init_state(batch_shape, dtype)

    def __call__(self, x, state=None, *, key=None, noise=None, parallel=True, return_states=False):
        y, state = self.mamba(
            self.pre(x, key, noise=noise), state, parallel=parallel, return_states=return_states
        )
        return self.out(y), state


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


class KalMambaBelief(NamedTuple):
    """The online belief at step ``t`` (:meth:`belief_step` of :func:`kalmamba`): the Gaussian
    ``N(mean, diag(cov))`` over ``z_t`` (filtered after ``condition``, predicted after
    ``predict``) and the Mamba backbone's recurrence around step ``t``:

        base    the Mamba state before step t's input (one :class:`pssm.mamba.MambaState` per
                block: conv buffers and selective states)
        action  a_{t-1}, the previous action (zero at t = 0)
        mamba   the state after step t's input [wbar_t, a_{t-1}, mask_t];   m  its output m_t

    ``condition`` recomputes ``(m, mamba)`` from ``base`` with the real input (exactly the
    program's step ``t``); ``predict`` moves on (``base' = mamba``, ``action' = a_t``) and runs
    a *tentative* step fed the predicted mean as the latent observation, flagged observed (the
    paper feeds ``w_t``, which imagination does not have; the mean is the best stand-in and what
    ``m`` is regularised towards), which a following ``condition`` replaces. Shapes: ``mean``,
    ``cov``, ``m`` ``(B, d)``, ``action`` ``(B, u)``, states with leading ``(B,)``.
    """

    mean: jax.Array
    cov: jax.Array
    m: jax.Array
    mamba: tuple[MambaState, ...]
    base: tuple[MambaState, ...]
    action: jax.Array


def _shift(x: jax.Array) -> jax.Array:
    """``x_{t-1}`` along axis 1 (zero at ``t = 0``): ``a_{t-1}``, the state before step ``t``."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


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
    dynamics_hidden: int | None = None,
    d_model: int = 256,
    pre_layers: int = 2,
    num_blocks: int = 2,
    d_state: int = 64,
    d_conv: int = 2,
    expand: int = 2,
    dropout: float = 0.1,
    mc_dropout: bool = True,
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
        hidden: widths of the encoders', decoders' and reward head's hidden layers.
        dynamics_hidden: width of the post-Mamba VRKN dynamics model (``None``: ``hidden``'s
            first width).
        d_model, pre_layers: the backbone's width and its number of SiLU layers before the Mamba.
        num_blocks, d_state, d_conv, expand: the Mamba stack (:class:`pssm.mamba.Mamba`).
        dropout: MC-dropout rate of the pre- and post-Mamba networks.
        mc_dropout: draw the dropout site in the program (training, ``Predictive``); ``False``:
            the program never drops (the belief step's ``act_dropout`` still uses ``dropout``).
        reward: build the reward head (scored when the model is given ``rewards``).
        parallel: associative scans in the Mamba (and in :meth:`regulariser`'s filter).
        obs_var, learn_obs_var, min_obs_var: decoder variances (fixed, as the paper, or learned).
        min_latent_obs_var: floor of the encoders' variances ``r_t^(k)``.
        A_bounds, Q_bounds: ``(lo, hi, value at zero)`` of the transition entries and variances.
        observed_dim: ``m``, how many latent coordinates the latent observations cover
            (``None``: all, ``H = I`` as the paper). With ``m < d`` the encoders emit ``m``
            coordinates and the others are never observed (RKN's ``H = [I_m, 0]``,
            :func:`pssm.inputs.partial_observation`): they enter the backbone as 0
            and are filled by the dynamics' offset ``b_t(m_t, a_t)`` alone.
        name: prefix of every parameter site.
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None, rewards=None, pixel_mask=None)`` with latent sites
        ``"z_0"``, ``"z"`` and (with ``mc_dropout`` and ``dropout > 0``, under a ``seed``
        handler) the dropout site ``"<name>_dropout"``, carrying ``model.structure`` (for
        Kalman guides), ``model.forward`` (:class:`Forward` of prepared inputs; draws the
        dropout site),
        ``model.regulariser`` (``R`` per sequence, of one forward pass),
        ``model.networks()`` / ``model.reward()`` / ``model.decoders()`` (register parameters,
        return pure functions), ``model.prepare`` (checked :class:`Inputs`),
        ``model.preprocess`` (images to floats), ``model.belief_step(act_dropout=False)`` (the
        online filter, :class:`KalMambaBelief`), the sizes ``latent_dim``, ``action_dim``,
        ``obs_dims``, ``parallel``, ``feature_size``, ``observed_dim`` and ``mc_dropout``
        (whether the program draws dropout masks). ``pixel_mask``: per-pixel likelihood masks
        (:func:`pssm.inputs.gaussian_observations`).
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
    dynamics = nets.VRKNTransition(
        d, u, widths[0] if dynamics_hidden is None else int(dynamics_hidden), rate=dropout,
        A_bounds=A_bounds, Q_bounds=Q_bounds, activation=nnx.silu, rngs=rngs,
    )  # fmt: skip
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

    names = list(dims)

    # The pieces of the inference side, shared by the forward pass (whole sequences, leading
    # (B, T)) and the belief step (one step, leading (B,)).

    def initial(n: Networks, batch_size: int) -> kalman.Gaussian:
        """The prior ``N(0, diag(P_0))`` of ``z_0``, ``(B, d)``."""
        shape = (batch_size, d)
        return kalman.Gaussian(jnp.zeros(shape, dtype), jnp.broadcast_to(n.P0, shape))

    def encode(n: Networks, obs: Mapping) -> tuple[jax.Array, jax.Array]:
        """``w^(k), r^(k) = enc_k(o^(k))`` of every modality, stacked ``(..., K, d)``."""
        w, R = zip(*(n.encoders[k](obs[k]) for k in names), strict=True)
        return jnp.stack(w, axis=-2), jnp.stack(R, axis=-2)

    def transition(n: Networks, m: jax.Array, action, key=None, noise=None) -> kalman.Dynamics:
        """``A_t, b_t, Q_t = dyn(m_t, a_t)`` (no ``a_t`` without actions)."""
        a = action.astype(m.dtype) if u else jnp.zeros((*m.shape[:-1], 0), m.dtype)
        return kalman.Dynamics(*n.dynamics(m, a, key, noise))

    n_pre, n_dyn = backbone.pre.noise_size, dynamics.noise_size
    draw_masks = bool(mc_dropout) and dropout > 0.0

    def dropout_noise(B: int, T: int):
        """The dropout noise of ``pre`` and ``dyn``, ``(B, T, n_pre + n_dyn)``, or ``None`` (no
        MC dropout in the program, or no ``seed`` handler: no key, no dropout)."""
        if not draw_masks or numpyro.prng_key() is None:
            return None
        with numpyro.plate("batch", B):
            return numpyro.sample(
                f"{name}_dropout", MCDropout.noise_distribution((T, n_pre + n_dyn)).to_event(2)
            )

    def _forward(n: Networks, x: Inputs, *, key=None, noise=None, return_states=False) -> Forward:
        """The inference side on whole sequences; dropout masks from uniform ``noise``
        ``(B, T, n_pre + n_dyn)`` (the program's site) or from ``key`` (acting); neither: none."""
        w, R = encode(n, x.obs)  # (B, T, K, d)
        a_prev = _shift(x.actions) if u else None
        k_pre, k_dyn = _keys(key, 2)
        u_pre = u_dyn = None
        if noise is not None:
            u_pre, u_dyn = noise[..., :n_pre], noise[:, :-1, n_pre:]
        m, state = n.backbone(
            backbone_inputs(fuse(w, R, x.mask), a_prev, x.mask),
            key=k_pre, noise=u_pre, parallel=parallel, return_states=return_states,
        )  # fmt: skip
        dyn = transition(n, m[:, :-1], x.actions[:, :-1] if u else None, k_dyn, u_dyn)
        emissions = (
            latent_emissions(w, R, x.mask) if observed < d else kalman.Emissions(w, R, x.mask)
        )
        return Forward(Structure(initial(n, w.shape[0]), dyn, emissions), m, state)

    def forward(x: Inputs, *, return_states=False) -> Forward:
        """The program's forward pass: registers the networks and draws the dropout site."""
        n = networks()
        noise = dropout_noise(*x.mask.shape[:2])
        return _forward(n, x, noise=noise, return_states=return_states)

    def filtered(s: Structure) -> kalman.Gaussian:
        """The filtered beliefs ``q(z_t | o_{<=t}, a_{<t})`` ``(B, T, d)`` of a structure."""
        return jax.vmap(partial(kalman.filter, parallel=parallel))(*s).filtered

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

    def structure(obs, actions=None, mask=None, rewards=None) -> Structure:
        return forward(prepare(obs, actions, mask)).structure

    def regulariser(obs, actions=None, mask=None, rewards=None, pixel_mask=None, *, detach=True):
        """``R`` per sequence ``(B,)`` (Eq. 2) of one forward pass (which draws the dropout
        site, as ``structure`` does); ``detach`` stops its gradient into the filtered moments
        (only ``m`` is pulled). ``pixel_mask`` (the program's) does not enter ``R``."""
        f = forward(prepare(obs, actions, mask))
        filt = filtered(f.structure)
        if detach:
            filt = jax.lax.stop_gradient(filt)
        return mahalanobis(f.m, filt)

    @linear_gaussian(structure)
    def model(obs, actions=None, mask=None, rewards=None, pixel_mask=None):
        x = prepare(obs, actions, mask)
        if rewards is not None:  # fail before any work
            _require_reward()
            if jnp.shape(rewards) != x.mask.shape[:2]:
                raise ValueError(f"rewards has shape {jnp.shape(rewards)}, expected (B, T)")
        z = sample_latent_path(*model_prior_conditionals(forward(x).structure))
        means = {k: fn(z) for k, fn in decoder_fns().items()}
        gaussian_observations(
            x, means, sites, prefix=name, obs_var=obs_var, learn_obs_var=learn_obs_var,
            min_obs_var=min_obs_var, pixel_mask=pixel_mask,
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

    visible = jnp.arange(d) < observed  # the latent coordinates an encoder emits

    def belief_step(act_dropout: bool = False) -> BeliefStep:
        """The online filter (:mod:`pssm.belief`) over :class:`KalMambaBelief`, from the
        program's own pieces (encoders, ``fuse``, :func:`backbone_inputs`, dynamics, prior):

            condition(o_t)  N(mean, cov) <- kalman.update with w_t^(k), r_t^(k) = enc_k(o_t^(k))
                            (information form, masked sensors skipped); (m_t, mamba) = one
                            backbone step from ``base`` on [wbar_t, a_{t-1}, mask_t]
            predict(a_t)    A_t, b_t, Q_t = dyn(m_t, a_t); N(mean, cov) <- kalman.predict
                            (no sampling); one backbone step from ``mamba`` on
                            [mean_{t+1}, a_t, 1] (the tentative step of :class:`KalMambaBelief`)
            filter          the time-parallel forward pass and kalman.filter at once
            features        the belief mean (the paper's SAC input, Sec. 3)

        so alternating ``condition`` / ``predict`` over a sequence gives ``filter``'s beliefs (a
        fully masked step keeps the Gaussian but still advances the Mamba with ``wbar = 0`` and
        zero mask flags, as the program does). ``act_dropout``: MC-dropout masks from the steps'
        keys (fresh Monte-Carlo samples of the dynamics, not the program's dropout site); off,
        the keys are unused.
        """
        n = networks()
        drop = (lambda key: key) if act_dropout else (lambda key: None)

        def backbone_step(state, wbar, a_prev, mask, key):
            """One backbone step from ``state``: ``(m_t (B, d), state after it)``."""
            x = backbone_inputs(wbar, a_prev if u else None, mask)[:, None]
            m, state = n.backbone(x, state, key=key, parallel=False)
            return m[:, 0], state

        def init(batch_size):
            prior = initial(n, batch_size)
            base = backbone.init_state((batch_size,), prior.mean.dtype)
            action = jnp.zeros((batch_size, u), prior.mean.dtype)
            seen = jnp.ones((batch_size, K), bool)
            m, state = backbone_step(base, prior.mean, action, seen, None)
            return KalMambaBelief(prior.mean, prior.cov, m, state, base, action)

        def condition(belief, obs, mask, key):
            obs, seen = step_observations(preprocess(obs), mask, names)
            w, R = encode(n, {k: o.astype(belief.mean.dtype) for k, o in obs.items()})
            post, _ = kalman.update(kalman.Gaussian(belief.mean, belief.cov), w, R, seen)
            wbar = fuse(w, R, seen)
            m, state = backbone_step(belief.base, wbar, belief.action, seen, drop(key))
            return belief._replace(mean=post.mean, cov=post.cov, m=m, mamba=state)

        def predict(belief, action, key):
            a = jnp.asarray(action, belief.mean.dtype).reshape(belief.mean.shape[0], u)
            k_dyn, k_pre = _keys(drop(key), 2)
            now = kalman.Gaussian(belief.mean, belief.cov)
            pred = kalman.predict(now, transition(n, belief.m, a, k_dyn))
            seen = jnp.ones((a.shape[0], K), bool)
            pseudo = jnp.where(visible, pred.mean, 0.0)  # as an observation would be fed
            m, state = backbone_step(belief.mamba, pseudo, a, seen, k_pre)
            return KalMambaBelief(pred.mean, pred.cov, m, state, belief.mamba, a)

        def filter_(obs, actions, mask, key):
            x = prepare(obs, actions, mask)
            f = _forward(n, x, key=drop(key), return_states=True)
            filt = filtered(f.structure)
            B, T = x.mask.shape[:2]
            a_prev = _shift(x.actions) if u else jnp.zeros((B, T, 0), filt.mean.dtype)
            base = jax.tree.map(_shift, f.mamba_state)
            return KalMambaBelief(filt.mean, filt.cov, f.m, f.mamba_state, base, a_prev)

        head = None if reward_head is None else reward_fn()
        dec = decoder_fns()

        def decode(f):
            out = {k: fn(f) for k, fn in dec.items()}
            return out if isinstance(obs_dims, Mapping) else out[names[0]]

        features = lambda b: b.mean
        return BeliefStep(init, condition, predict, features, head, decode, filter_)

    model.forward, model.prepare, model.regulariser = forward, prepare, regulariser
    model.preprocess = preprocess
    model.networks, model.reward, model.decoders = networks, reward_fn, decoder_fns
    model.belief_step = belief_step
    model.latent_dim, model.action_dim, model.obs_dims = d, u, dims
    model.parallel, model.feature_size, model.observed_dim = parallel, d, observed
    model.mc_dropout = draw_masks
    return model
