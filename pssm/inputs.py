"""Model inputs shared by the families: modalities and their shapes, validation of ``(obs,
actions, mask)`` into one form (:class:`Inputs`), Gaussian observation sites (masked per step
and modality, and per pixel where a program is given a ``pixel_mask``; or hidden altogether,
:func:`without_reconstruction`), and the latent observations ``w_t^(k), r_t^(k)`` of
encoder-based models (precision-weighted fusion, RKN's partial observation ``H = [I_m, 0]``,
their Kalman emissions).

Conventions of :mod:`pssm.core`: observations ``(B, T, *shape)`` (one array, or a dict of
modalities whose key order is the mask order), actions ``(B, T, u)``, masks ``(B, T)`` or
``(B, T, K)``; observed sites ``"obs"`` (one array) or ``"obs_<name>"`` per modality.
One step's observations, as a belief step takes them, are :mod:`pssm.observations`'.
"""

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints

from inference import kalman

from . import nets
from .core import check_inputs, check_mask

__all__ = [
    "Inputs",
    "Shape",
    "event_shape",
    "fuse",
    "entry_masks",
    "gaussian_observations",
    "is_observation_site",
    "latent_emissions",
    "modalities",
    "observation_sites",
    "observed_size",
    "partial_observation",
    "prepare_inputs",
    "without_reconstruction",
]


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
    the key order of ``obs_dims``; for a model without actions, zero-width ``actions``
    ``(B, T, 0)`` count as none. Raises ``ValueError`` for shape mismatches, missing or
    unexpected actions, and NaN/inf in observations not marked missing (when concrete).
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
        if jnp.shape(actions)[-1:] != (0,):
            raise ValueError("this model was built with action_dim=0 but was given actions")
        actions = None  # zero-width actions (B, T, 0) are no actions
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


def entry_masks(x: Inputs, pixel_mask, sites: Mapping[str, str]) -> dict[str, jax.Array]:
    """Per-entry likelihood masks ``{modality: (B, T, *shape)}`` (broadcastable, boolean) from a
    program's ``pixel_mask`` argument: ``None`` (every entry counts), an array for a model of
    one unnamed observation, or ``{modality: array}`` (modalities not named: every entry
    counts). A modality's mask has the shape ``(B, T, *shape)`` of its observations or, for an
    image ``(H, W, C)``, ``(B, T, H, W)``: one flag per pixel, the same for every channel."""
    if pixel_mask is None:
        return {}
    single = list(sites.values()) == ["obs"]
    if not isinstance(pixel_mask, Mapping):
        if not single:
            raise ValueError("this model has named modalities: give pixel_mask as {modality: mask}")
        pixel_mask = {"obs": pixel_mask}
    if bad := set(pixel_mask) - set(x.obs):
        raise ValueError(
            f"pixel_mask names {sorted(bad)}, the model's modalities are {list(x.obs)}"
        )
    out = {}
    for k, m in pixel_mask.items():
        shape, m_shape = jnp.shape(x.obs[k]), jnp.shape(m)
        if m_shape == shape[:-1] and len(shape) == 5:  # (B, T, H, W): the same for each channel
            m = m[..., None] if isinstance(m, jax.core.Tracer) else np.asarray(m)[..., None]
        elif m_shape != shape:
            raise ValueError(f"pixel_mask[{k!r}] has shape {m_shape}, expected {shape}"
                             + (f" or {shape[:-1]}" if len(shape) == 5 else ""))  # fmt: skip
        check_mask(f"pixel_mask[{k!r}]", m)
        out[k] = jnp.asarray(m).astype(bool)
    return out


def gaussian_observations(
    x: Inputs,
    means: Mapping[str, jax.Array],
    sites: Mapping[str, str],
    *,
    prefix: str,
    obs_var: float = 1.0,
    learn_obs_var: bool = False,
    min_obs_var: float = 0.01,
    pixel_mask=None,
) -> None:
    """Score ``o_t^(k) ~ N(means[k]_t, diag(sigma_k^2))`` for every modality, masked per
    modality and step (a masked entry contributes exactly 0), at the sites ``sites[k]`` inside
    the plate ``"batch"``. A learned ``sigma_k^2`` is the parameter ``"<prefix>_obs_var_<k>"``
    (one per entry of the modality's trailing shape, e.g. per pixel and channel of an image).

    ``pixel_mask`` (:func:`entry_masks`) masks single entries as well: the log-likelihood of a
    step is ``sum_i pi_i log N(o_i; mu_i, sigma_i^2)`` over the entries ``i`` with the per-pixel
    flags ``pi_i`` (broadcast over an image's channels): the masked reconstruction of VRKN's
    occlusion tasks (Becker & Neumann 2022, Sec. 4.2: only non-occluded pixels contribute). A
    masked entry's value enters neither the value nor the gradient (it is replaced by 0 before
    scoring)."""
    entries = entry_masks(x, pixel_mask, sites)
    for k, (modality, o) in enumerate(x.obs.items()):
        var = jnp.full(o.shape[2:], obs_var, nets.default_param_dtype())
        if learn_obs_var:
            var = numpyro.param(
                f"{prefix}_obs_var_{modality}", var,
                constraint=constraints.greater_than(min_obs_var),
            )  # fmt: skip
        likelihood = dist.Normal(means[modality], jnp.sqrt(var))
        if modality in entries:
            o = jnp.where(entries[modality], o, 0.0)
            likelihood = likelihood.mask(entries[modality])
        likelihood = likelihood.to_event(o.ndim - 2)
        with numpyro.plate("batch", o.shape[0]):
            numpyro.sample(sites[modality], likelihood.mask(x.mask[..., k]).to_event(1), obs=o)


def is_observation_site(name: str) -> bool:
    """Whether ``name`` is an observation site of the conventions of :mod:`pssm.core`
    (``"obs"`` or ``"obs_<modality>"``; the reward site ``"reward"`` is not)."""
    return name == "obs" or name.startswith("obs_")


def without_reconstruction(model):
    """The program ``model`` with its observation sites (:func:`is_observation_site`) hidden
    from inference: every ELBO then scores the latent path (its KL) and the rewards, and no
    observation (the reward-only baseline of Becker & Neumann 2022, Fig. 6: a model trained
    without reconstruction). The encoders still read the observations, through the guide and
    the model's own filter; the decoders receive no gradient. The returned program keeps the
    model's attributes (``structure``, ``belief_step``, ...), so guides, ELBOs and acting use it
    as they use ``model``."""
    hidden = handlers.block(
        model, hide_fn=lambda msg: msg["type"] == "sample" and is_observation_site(msg["name"])
    )

    @functools.wraps(model)
    def program(*args, **kwargs):
        return hidden(*args, **kwargs)

    return program


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
