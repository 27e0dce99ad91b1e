"""Filtering guide family (RSSM / PlaNet / Dreamer):

    q(z_{0:T-1} | o) = q(z_0 | o_0) prod_t q(z_t | z_{t-1}, a_{t-1}, o_t)

Each factor sees the past (through the sampled previous state) and the current observation
only, never the future: the RSSM bound of the VRKN paper (Eq. 3). The closed-form member uses
the exact one-step posterior ``p(z_t | z_{t-1}, o_t)`` of a model's latent LGSSM (the VRKN
paper's "CF" variant of Figure 2); it reads the model only through ``model.structure``. The
amortised member (:func:`filtering`) learns the factors with a network (Hafner et al. 2019,
PlaNet); for the RSSM it recomputes the deterministic path from its own samples.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from flax import nnx
from numpyro.contrib.control_flow import scan

from inference import kalman
from pssm.core import check_inputs, gaussian, sample_latent_path
from pssm.nets import GaussianMLP, default_param_dtype, register


def closed_form_filtering(model):
    """Guide: ``prod_t p(z_t | z_{t-1}, o_t)`` from the model's latent LGSSM (exact factors)."""
    if not hasattr(model, "structure"):
        raise TypeError("closed_form_filtering needs a model declared with pssm.linear_gaussian")

    def guide(obs, *args, rewards=None, **kwargs):  # rewards: scored by the model only
        s = model.structure(obs, *args, **kwargs)
        first, conditionals = jax.vmap(kalman.one_step_conditionals)(*s)
        return sample_latent_path(first, conditionals)

    return guide


def filtering(
    model,
    *,
    hidden: int | Sequence[int] = 64,
    name: str = "filter_net",
    latent_dim: int | None = None,
    min_var: float = 1e-4,
    seed: int = 0,
):
    """Guide: amortised filtering ``prod_t q(z_t | z_{t-1}, a_{t-1}, o_t)`` (RSSM posterior).

    Each factor is ``N(mu_t, diag(sigma_t^2))`` with ``(mu_t, sigma_t^2) = net(x_t)``, an NNX
    :class:`pssm.nets.GaussianMLP` registered as ``name`` on the inputs

        x_t = [z_{t-1}, a_{t-1}, o_t, m_t, 1{t = 0}]      (z_{-1} = 0, a_{-1} = 0)

    or, for a model with a deterministic path (``model.deterministic``, the RSSM),

        x_t = [h_t, o_t, m_t, 1{t = 0}],   h_0 = 0,   h_t = f(h_{t-1}, z_{t-1}, a_{t-1}),

    with ``f = model.deterministic()``: ``h_t`` is recomputed from the guide's own samples
    through the model's parameter sites (shared with the model), the RSSM posterior
    ``q(z_t | h_t, o_t)`` (Hafner et al. 2019). ``o_t`` is the observation (modalities of a
    dict concatenated in the order of ``model.obs_dims`` if the model has it, else of the
    dict's keys), zero where missing, and ``m_t`` the mask flags (one per modality; all ones
    without a mask).

    Args:
        model: any model with the sites ``"z_0"``, ``"z"`` of :mod:`pssm.core`.
        hidden: width of the network's hidden layer, or a sequence of widths.
        name: the network's parameter site (``"<name>$params"``).
        latent_dim: size of ``z_t``; default ``model.latent_dim``, else read from the ``"z_0"``
            site of an abstract trace of the model.
        min_var: floor of the factors' variances.
        seed: initialisation of the network weights.

    Returns:
        A NumPyro guide with the model's signature ``(obs, actions=None, mask=None)``; it
        samples ``"z_0"`` ``(B, d)`` and ``"z"`` ``(T-1, B, d)`` (a ``scan``, plate inside) and
        returns the path ``(B, T, d)``; ``guide.posterior(in_features)`` gives its factor network
        for stepwise filtering (agents). Use it with ``Trace_ELBO`` or ``TraceMeanField_ELBO``
        (per-step analytic KL to the model's prior factor, the RSSM objective).
    """
    widths = (int(hidden),) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    has_path = hasattr(model, "deterministic")
    networks = {}

    def network(in_features, d):
        if (in_features, d) not in networks:
            with jax.ensure_compile_time_eval():  # concrete initial weights, even under jit
                networks[in_features, d] = GaussianMLP(
                    in_features, widths, d, min_var=min_var, rngs=nnx.Rngs(seed)
                )
        return networks[in_features, d]

    def guide(obs, actions=None, mask=None, rewards=None):  # rewards: scored by the model only
        o, m = _flatten_observations(obs, actions, mask, getattr(model, "obs_dims", None))
        B, T = m.shape[:2]
        o = o.astype(jnp.promote_types(o.dtype, default_param_dtype()))  # the networks' dtype
        d = latent_dim or getattr(model, "latent_dim", None)
        d = d or _latent_dim(model, obs, actions, mask)
        a = jnp.zeros((B, T, 0), o.dtype) if actions is None else jnp.asarray(actions)
        flag = jnp.zeros((B, T, 1), o.dtype).at[:, 0].set(1.0)
        seen = jnp.concatenate([o, m.astype(o.dtype), flag], axis=-1)  # (B, T, p + K + 1)
        if has_path:
            step = model.deterministic()
            state = jnp.zeros((B, model.deterministic_size), o.dtype)
        else:
            state = jnp.zeros((B, d + a.shape[-1]), o.dtype)
        net = register(name, network(state.shape[-1] + seen.shape[-1], d))

        def factor(state, seen_t):
            return gaussian(*net(jnp.concatenate([state, seen_t], axis=-1)))

        with numpyro.plate("batch", B):
            z0 = numpyro.sample("z_0", factor(state, seen[:, 0]))

        def transition(carry, xs):
            state, z = carry
            a_prev, seen_t = xs
            state = step(state, z, a_prev) if has_path else jnp.concatenate([z, a_prev], -1)
            with numpyro.plate("batch", B):
                z = numpyro.sample("z", factor(state, seen_t))
            return (state, z), z

        xs = (jnp.moveaxis(a[:, :-1], 1, 0), jnp.moveaxis(seen[:, 1:], 1, 0))
        if seen.shape[1] > 1:
            _, zs = scan(transition, (state, z0), xs)
        else:  # T = 1: z_0 alone, no site "z" (NumPyro's scan cannot replay a length-0 site)
            zs = jnp.zeros((0, *z0.shape), z0.dtype)
        return jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)

    def posterior(in_features: int):
        """The factor network as a function ``x_t -> (mu_t, sigma_t^2)`` (its parameter site
        registered), for stepwise filtering outside the guide: ``x_t`` is laid out as in the
        guide, ``[state, o_t, m_t, 1{t = 0}]`` with ``in_features`` entries in all."""
        d = latent_dim or getattr(model, "latent_dim", None)
        if d is None:
            raise ValueError("pass latent_dim= to filtering() to step its posterior network")
        return register(name, network(int(in_features), int(d)))

    guide.posterior = posterior
    return guide


def _flatten_observations(obs, actions, mask, order=None):
    """``(o, m)``: observations ``(B, T, p)`` (modalities of a dict concatenated in the model's
    order ``order`` when it names them, else in key order; zero where missing) and mask flags
    ``(B, T, K)``, after :func:`pssm.core.check_inputs`.

    ``mask`` is ``(B, T)`` or ``(B, T, K)``: one flag per modality of a dict (same order), or per
    sensor of one array (a step of an array counts as observed if any of its flags is set)."""
    if isinstance(obs, Mapping):
        names = list(order) if isinstance(order, Mapping) and set(order) == set(obs) else list(obs)
        parts = [obs[k] for k in names]
    else:
        parts = [obs]
    B, T = jnp.shape(parts[0])[:2]
    K = len(parts)
    if mask is not None and isinstance(obs, Mapping) and jnp.shape(mask) not in ((B, T), (B, T, K)):
        raise ValueError(
            f"mask has shape {jnp.shape(mask)}, expected ({B}, {T}) or ({B}, {T}, {K})"
        )
    # a concrete mask stays a NumPy array, so that check_inputs can read it even under a trace
    xp = jnp if isinstance(mask, jax.core.Tracer) else np
    m = xp.ones((B, T, K), bool) if mask is None else xp.asarray(mask).astype(bool)
    if m.ndim == 2:
        m = xp.broadcast_to(m[..., None], (B, T, K))
    flat = []
    for k, o in enumerate(parts):
        m_k = m if K == 1 else m[..., k]
        check_inputs(o, actions, m_k)
        observed = m_k.any(-1) if m_k.ndim == 3 else m_k
        o = jnp.reshape(o, (B, T, -1))
        flat.append(jnp.where(observed[..., None], o, 0.0))
    return jnp.concatenate(flat, axis=-1), jnp.asarray(m)


def _latent_dim(model, obs, actions, mask) -> int:
    """Size of ``z_t`` from the ``"z_0"`` site of an abstract (shape-only) trace of ``model``."""

    def z0(obs, actions, mask):
        with numpyro.handlers.block():
            tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(
                obs, actions, mask
            )
        return tr["z_0"]["value"]

    return jax.eval_shape(z0, obs, actions, mask).shape[-1]
