"""A locally-linear latent SSM: the low-dimensional skeleton of VRKN (Becker & Neumann 2022).

For ``K`` modalities ``o_t^(k)`` (one array, or a dict of them) and latent ``z_t`` of size ``d``:

    encoders      w_t^(k), r_t^(k) = enc_k(o_t^(k))          latent observation, variance > 0
    fused         wbar_t = sum_k m_t^k w_t^(k) / r_t^(k)  /  sum_k m_t^k / r_t^(k)   (0 if none)
    dynamics      A_t, b_t, Q_t = dyn(wbar_t, a_t)            A_t in [0.1, 0.99], Q_t in [1e-3, 0.1]
    prior         z_0 ~ N(m_0, diag(P_0))                     m_0, P_0 learned
                  z_{t+1} ~ N(A_t * z_t + b_t, diag(Q_t))     (elementwise: diagonal A_t)
    likelihood    o_t^(k) ~ N(dec_k(z_t), diag(sigma_k^2))    unless masked (m_t^k = 0)

with the latent linear-Gaussian emissions ``w_t^(k) = z_t + N(0, diag(r_t^(k)))`` that the
Kalman-based guides condition on (``model.structure``). ``A_t`` and ``Q_t`` pass through VRKN's
scaled sigmoids (:func:`pssm.nets.scaled_sigmoid`: 0.9 and 0.01 at zero input), keeping the
latent dynamics stable (VRKN paper, Sec. 3.1-3.2; several sensors as in its "Sensor Fusion").
The model is declared with ``pssm.core.linear_gaussian(structure)`` but is *not* exact: its
likelihood is the decoders', the latent LGSSM only places the guide.

The dynamics depend on the encoded observations: the model is locally linear, *linearised at
the data* (as KalMamba computes its dynamics from the latent observations and actions), so
the prior ``p(z_{t+1} | z_t)`` of a sequence is defined given that sequence's observations,
and a guide from :mod:`inference.guides` (``kalman_smoothing``, ``backward_sampling``) gives the
exact posterior of the latent LGSSM. VRKN proper linearises at the *filtered mean* with a
gated recurrent transition network, which makes the filter recurrent; that model comes with
the deep zoo. Missing data: a masked modality and step skips its Kalman update, contributes
nothing to the likelihood, and drops out of the fused ``wbar_t``.

Time and batch conventions in :mod:`pssm.core`: ``a_t`` drives ``z_t -> z_{t+1}``, latent sites
``"z_0"`` ``(B, d)`` and ``"z"`` ``(T-1, B, d)``; observation sites ``"obs"`` (one array) or
``"obs_<name>"`` per modality of a dict.
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.distributions import constraints

from inference import kalman

from . import nets
from .core import (
    Structure,
    check_inputs,
    check_mask,
    linear_gaussian,
    model_prior_conditionals,
    sample_latent_path,
)


class Inputs(NamedTuple):
    """Validated model inputs.

    Attributes:
        obs: ``{name: (B, T, p_k)}`` in modality order, masked entries replaced by 0.
        mask: ``(B, T, K)`` boolean, ``True`` where a modality is observed.
        actions: ``(B, T, u)``, or ``None`` for a model without actions.
    """

    obs: dict
    mask: jax.Array
    actions: jax.Array | None


Shape = int | tuple[int, ...]


def _shape(v) -> Shape:
    """A modality's trailing shape: an int ``p`` (a vector) or a tuple such as ``(H, W, C)``."""
    shape = tuple(int(s) for s in np.atleast_1d(v))
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"a modality's shape must be positive sizes, got {v!r}")
    return shape[0] if len(shape) == 1 else shape


def modalities(obs_dims: Shape | Mapping[str, Shape]) -> dict[str, Shape]:
    """``{name: shape}``: a dict as given (its key order is the mask order), else ``"obs"``.

    A shape is an int ``p`` for vector observations ``(B, T, p)`` or a tuple of trailing sizes,
    e.g. ``(64, 64, 3)`` for images ``(B, T, 64, 64, 3)`` (a 1-tuple ``(p,)`` is read as ``p``).
    """
    if isinstance(obs_dims, Mapping):
        if not obs_dims:
            raise ValueError("obs_dims is an empty dict")
        return {str(k): _shape(v) for k, v in obs_dims.items()}
    return {"obs": _shape(obs_dims)}


def event_shape(shape: Shape) -> tuple[int, ...]:
    """A modality's shape as a tuple: ``p -> (p,)``, ``(H, W, C)`` unchanged."""
    return (shape,) if isinstance(shape, int) else tuple(shape)


def prepare_inputs(obs_dims, action_dim: int, obs, actions=None, mask=None) -> Inputs:
    """Check ``(obs, actions, mask)`` against the sizes of a model and bring them to one form.

    ``obs`` is an array ``(B, T, *shape)`` when ``obs_dims`` is one modality's shape (an int
    ``p`` or a tuple such as ``(H, W, C)``), else a dict with the same keys (in any order);
    ``mask`` is ``None``, ``(B, T)`` (one flag per step, for every modality) or ``(B, T, K)`` in
    the key order of ``obs_dims``. Raises ``ValueError`` for
    shape mismatches, missing or unexpected actions, and NaN/inf in observations not marked
    missing (when concrete).
    """
    dims = modalities(obs_dims)
    names = list(dims)
    if isinstance(obs_dims, Mapping):
        if not isinstance(obs, Mapping) or set(obs) != set(names):
            got = sorted(obs) if isinstance(obs, Mapping) else type(obs).__name__
            raise ValueError(f"obs must be a dict with keys {names}, got {got}")
        obs = {k: obs[k] for k in names}
    else:
        if isinstance(obs, Mapping):
            raise ValueError("this model has one modality: pass obs as an array (B, T, ...)")
        obs = {"obs": obs}
    first = jnp.shape(obs[names[0]])
    expected = event_shape(dims[names[0]])
    if len(first) != 2 + len(expected):
        raise ValueError(
            f"obs[{names[0]!r}] has shape {first}, expected (batch, time, *{expected})"
        )
    B, T = first[:2]
    if action_dim and actions is None:
        raise ValueError(f"this model takes actions: pass an array ({B}, {T}, {action_dim})")
    if not action_dim and actions is not None:
        raise ValueError("this model was built with action_dim=0 but was given actions")
    K = len(names)
    # a concrete mask stays a NumPy array, so that check_inputs can read it even under a trace
    xp = jnp if isinstance(mask, jax.core.Tracer) else np
    if mask is None:
        mask = np.ones((B, T, K), bool)
    else:
        m_shape = jnp.shape(mask)
        if m_shape not in ((B, T), (B, T, K)):
            raise ValueError(f"mask has shape {m_shape}, expected ({B}, {T}) or ({B}, {T}, {K})")
        check_mask("mask", mask)  # before it becomes boolean: 0.5 or -1 would read as observed
        mask = xp.asarray(mask).astype(bool)
        mask = xp.broadcast_to(mask[..., None], (B, T, K)) if mask.ndim == 2 else mask
    clean = {}
    for k, (name, o) in enumerate(obs.items()):
        if jnp.shape(o)[:2] != (B, T):
            raise ValueError(f"obs[{name!r}] has shape {jnp.shape(o)}, expected ({B}, {T}, ...)")
        check_inputs(o, actions, mask[..., k], obs_dim=dims[name], action_dim=action_dim or None)
        m = mask[..., k].reshape((B, T) + (1,) * (len(jnp.shape(o)) - 2))
        clean[name] = jnp.where(m, o, 0.0)  # missing entries may be NaN
    return Inputs(clean, jnp.asarray(mask), actions)


def observation_sites(obs_dims) -> dict[str, str]:
    """Observed-site name per modality: ``"obs"`` for one array, ``"obs_<name>"`` for a dict."""
    if isinstance(obs_dims, Mapping):
        return {k: f"obs_{k}" for k in modalities(obs_dims)}
    return {"obs": "obs"}


def gaussian_observations(
    x: Inputs,
    means: Mapping[str, jax.Array],
    sites: Mapping[str, str],
    *,
    prefix: str,
    obs_var: float = 1.0,
    learn_obs_var: bool = False,
    min_obs_var: float = 0.01,
) -> None:
    """Score ``o_t^(k) ~ N(means[k]_t, diag(sigma_k^2))`` for every modality, masked per
    modality and step (a masked entry contributes exactly 0), at the sites ``sites[k]`` inside
    the plate ``"batch"``. A learned ``sigma_k^2`` is the parameter ``"<prefix>_obs_var_<k>"``
    (one per entry of the modality's trailing shape, e.g. per pixel and channel of an image)."""
    for k, (modality, o) in enumerate(x.obs.items()):
        var = jnp.full(o.shape[2:], obs_var, nets.default_param_dtype())
        if learn_obs_var:
            var = numpyro.param(
                f"{prefix}_obs_var_{modality}", var,
                constraint=constraints.greater_than(min_obs_var),
            )  # fmt: skip
        likelihood = dist.Normal(means[modality], jnp.sqrt(var)).to_event(o.ndim - 2)
        with numpyro.plate("batch", o.shape[0]):
            numpyro.sample(sites[modality], likelihood.mask(x.mask[..., k]).to_event(1), obs=o)


def fuse(w: jax.Array, R: jax.Array, mask: jax.Array) -> jax.Array:
    """Precision-weighted mean of the observed latent observations, ``(..., K, d) -> (..., d)``
    (0 where no modality is observed): the Kalman update of a flat prior."""
    precision = jnp.where(mask[..., None], 1.0 / R, 0.0)
    total = precision.sum(-2)
    return (precision * w).sum(-2) / jnp.where(total > 0, total, 1.0)


def observed_size(observed_dim: int | None, latent_dim: int) -> int:
    """``m``: how many latent coordinates the latent observations cover (``None``: all)."""
    m = latent_dim if observed_dim is None else int(observed_dim)
    if not 1 <= m <= latent_dim:
        raise ValueError(f"observed_dim must lie in [1, latent_dim={latent_dim}], got {m}")
    return m


def partial_observation(encoder, latent_dim: int):
    """Wrap ``encoder: o -> (w, r)`` of size ``m`` into size ``d = latent_dim`` with RKN's
    ``H = [I_m, 0]`` (Becker et al. 2019): ``w = 0`` and ``r = inf`` on coordinates
    ``m..d-1``, an observation without information, so elementwise Kalman updates and
    :func:`fuse` leave those coordinates alone (gradients stay finite: ``1/inf = 0``)."""

    def encode(o):
        w, r = encoder(o)
        if w.shape[-1] == latent_dim:
            return w, r
        pad = (*w.shape[:-1], latent_dim - w.shape[-1])
        w = jnp.concatenate([w, jnp.zeros(pad, w.dtype)], axis=-1)
        return w, jnp.concatenate([r, jnp.full(pad, jnp.inf, r.dtype)], axis=-1)

    return encode


def latent_emissions(w: jax.Array, R: jax.Array, mask: jax.Array) -> kalman.Emissions:
    """``kalman.Emissions`` of latent observations ``(B, T, K, d)`` with per-sensor ``mask``
    ``(B, T, K)``; coordinates with ``r = inf`` (see :func:`partial_observation`) become
    missing entries (the Kalman core wants finite variances)."""
    unseen = jnp.isinf(R)
    entries = jnp.logical_and(mask[..., None] > 0, ~unseen)
    return kalman.Emissions(w, jnp.where(unseen, 1.0, R), entries)


def _widths(hidden) -> tuple[int, ...]:
    return (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)


def locally_linear(
    obs_dims: int | Mapping[str, int],
    latent_dim: int,
    action_dim: int = 0,
    hidden: int | Sequence[int] = 64,
    *,
    obs_var: float = 1.0,
    learn_obs_var: bool = False,
    min_obs_var: float = 0.01,
    min_latent_obs_var: float = 1e-3,
    A_bounds: tuple[float, float, float] = (0.1, 0.99, 0.9),
    Q_bounds: tuple[float, float, float] = (1e-3, 0.1, 1e-2),
    name: str = "ll",
    seed: int = 0,
):
    """Build the locally-linear latent SSM (equations in the module docstring).

    Args:
        obs_dims: observation size ``p``, or ``{modality: p_k}`` for several modalities.
        latent_dim: ``d``, the size of ``z_t`` and of each latent observation ``w_t^(k)``.
        action_dim: ``u`` (``0``: no actions).
        hidden: width of the one hidden layer of every network, or a sequence of widths.
        obs_var: decoder variance ``sigma_k^2`` (initial value if learned).
        learn_obs_var: learn one variance per modality and feature (``> min_obs_var``).
        min_latent_obs_var: floor of the encoders' variances ``r_t^(k)``.
        A_bounds, Q_bounds: ``(lo, hi, value at zero)`` of the transition entries and variances.
        name: prefix of every parameter site (``"<name>_encoder_<modality>$params"``,
            ``"<name>_dynamics$params"``, ``"<name>_decoder_<modality>$params"``,
            ``"<name>_m0"``, ``"<name>_P0"``, ``"<name>_obs_var_<modality>"``).
        seed: initialisation of the network weights.

    Returns:
        ``model(obs, actions=None, mask=None)`` with latent sites ``"z_0"``, ``"z"``, carrying
        ``model.structure`` (the latent LGSSM, for Kalman guides), ``model.latent_dim``,
        ``model.action_dim`` and ``model.obs_dims`` (``{modality: p_k}``).
    """
    dims = modalities(obs_dims)
    if not all(isinstance(p, int) for p in dims.values()):
        raise ValueError(f"locally_linear takes vector modalities only, got shapes {dims}")
    d, u = int(latent_dim), int(action_dim)
    widths = _widths(hidden)
    rngs = nnx.Rngs(seed)
    encoders = {
        k: nets.GaussianMLP(p, widths, d, min_var=min_latent_obs_var, rngs=rngs)
        for k, p in dims.items()
    }
    dynamics = nets.DiagonalTransition(
        d + u, d, widths, A_bounds=A_bounds, Q_bounds=Q_bounds, rngs=rngs
    )
    decoders = {k: nets.MLP(d, widths, p, rngs=rngs) for k, p in dims.items()}
    dtype = nets.default_param_dtype()
    sites = observation_sites(obs_dims)

    def latent_lgssm(x: Inputs) -> Structure:
        w, R = zip(
            *(nets.register(f"{name}_encoder_{k}", encoders[k])(o) for k, o in x.obs.items()),
            strict=True,
        )
        w, R = jnp.stack(w, axis=2), jnp.stack(R, axis=2)  # (B, T, K, d)
        inputs = fuse(w, R, x.mask)[:, :-1]
        if u:
            inputs = jnp.concatenate([inputs, x.actions[:, :-1]], axis=-1)
        A, b, Q = nets.register(f"{name}_dynamics", dynamics)(inputs)
        m0 = numpyro.param(f"{name}_m0", jnp.zeros(d, dtype))
        P0 = numpyro.param(f"{name}_P0", jnp.ones(d, dtype), constraint=constraints.positive)
        B = w.shape[0]
        prior = kalman.Gaussian(jnp.broadcast_to(m0, (B, d)), jnp.broadcast_to(P0, (B, d)))
        return Structure(prior, kalman.Dynamics(A, b, Q), kalman.Emissions(w, R, x.mask))

    def structure(obs, actions=None, mask=None) -> Structure:
        return latent_lgssm(prepare_inputs(obs_dims, u, obs, actions, mask))

    @linear_gaussian(structure)
    def model(obs, actions=None, mask=None):
        x = prepare_inputs(obs_dims, u, obs, actions, mask)
        z = sample_latent_path(*model_prior_conditionals(latent_lgssm(x)))
        means = {k: nets.register(f"{name}_decoder_{k}", decoders[k])(z) for k in dims}
        gaussian_observations(
            x, means, sites, prefix=name, obs_var=obs_var, learn_obs_var=learn_obs_var,
            min_obs_var=min_obs_var,
        )  # fmt: skip
        return z

    model.latent_dim, model.action_dim, model.obs_dims = d, u, dims
    return model
