"""Smoothing guide for the RSSM (the "Smoothing RSSM" of Becker & Neumann 2022, Sec. 2.3):

    e_t = [emb_k(o_t^(k)) m_t^k]_k                       per-modality embedding, 0 if missing
    b_T = 0,   b_t = GRU_b(b_{t+1}, [e_t, m_t, a_t])     t = T-1, ..., 0   (backward in time)
    h_0 = 0,   h_t = f(h_{t-1}, z_{t-1}, a_{t-1})        the model's deterministic path
    q(z_t | z_{<t}, o_{0:T-1}) = N(mu, diag(sigma^2)),   (mu, sigma^2) = net([h_t, b_t, 1{t = 0}])

A GRU runs backwards over the embedded observations (and the actions, which drive the future
states), so ``b_t`` summarises ``o_{t:T-1}`` and ``a_{t:T-1}``: the factor sees the future, the
structure of the true posterior ``p(z_t | z_{t-1}, a_{t-1:}, o_{t:})`` of a state space model
(the smoothed dynamics of the VRKN bound, Eq. 3; a structured inference network, Krishnan et
al. 2017). ``h_t`` is recomputed from the guide's own samples through the model's parameter
sites, exactly as in the filtering guide, and the sites are the same (``"z_0"``, ``"z"``), so
``TraceMeanField_ELBO`` scores ``KL(q(z_t | h_t, b_t) || p(z_t | h_t))`` per step. The
filtering guide's bound (the RSSM objective) ignores the future; this one can be tight.

``emb_k`` is a conv encoder for images and the identity for vectors
(:class:`inference.guides.filtering.GuideNetworks`); a model without a deterministic path uses
``[z_{t-1}, a_{t-1}]`` in place of ``h_t``.

Acting online (``guide.belief_posterior``, for :func:`pssm.rssm.rssm`'s ``belief_step``): the
backward state needs the whole sequence, which an agent does not have. The online factor uses
``b_t`` of the sequence that *ends* at ``t`` (``b_{t+1} = 0``), an approximation:

    b_t = GRU_b(0, [e_t, m_t, 0])        q(z_t | h_t, b_t, 1{t = 0}) as above

with the action slot zero, since ``a_t`` is chosen only after conditioning on ``o_t``. It is the
training-time factor exactly at the last step of a sequence, if that step's action is zero;
earlier steps saw the future in training and see only ``o_t`` online. The networks and
parameter sites are the training ones (:func:`smoothing_factor`, used by both).
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from pssm.core import Dimensions, require

from .filtering import (
    GuideNetworks,
    first_flags,
    guide_inputs,
    latent_size,
    posterior_factor,
    sample_states,
    shapes,
    state_size,
    step_inputs,
    step_latent_size,
)


def smoothing_factor(networks: GuideNetworks, dims: Mapping, u: int, s: int, d: int, size: int):
    """Register the smoothing guide's networks (modalities ``dims``, ``u`` actions, state size
    ``s``, latent size ``d``, backward state size ``size``); returns ``(inputs, cell, factor)``:
    ``inputs(obs, mask (..., K), actions (..., u)) -> [e_t, m_t, a_t]`` on any leading axes,
    the backward cell ``(b_{t+1}, inputs_t) -> b_t`` and the factor on ``[s_t, b_t, 1{t = 0}]``
    (:func:`inference.guides.filtering.posterior_factor` of ``s_t`` and
    ``seen_t = [b_t, 1{t = 0}]``)."""
    embed = networks.embedding(dims)
    n = networks.embedding_size(dims) + len(dims) + u
    cell = networks.backward(n, size)
    factor = posterior_factor(networks.posterior(s + size + 1, d))

    def inputs(obs, mask, actions):
        e = embed(obs, mask)
        return jnp.concatenate([e, mask.astype(e.dtype), actions.astype(e.dtype)], axis=-1)

    return inputs, cell, factor


def smoothing_rssm(
    model,
    *,
    hidden: int | Sequence[int] = 64,
    backward_size: int = 64,
    name: str = "smoother_net",
    latent_dim: int | None = None,
    min_var: float = 1e-4,
    conv_depth: int = 32,
    embed_features: int | None = None,
    seed: int = 0,
):
    """Guide: ``prod_t q(z_t | h_t, b_t)`` with ``b_t`` a backward GRU over ``o_{t:}``, ``a_{t:}``.

    Args:
        model: an RSSM (:func:`pssm.rssm.rssm`), or any model with the sites ``"z_0"``, ``"z"``
            of :mod:`pssm.core`.
        hidden: width(s) of the posterior network's hidden layers.
        backward_size: size of the backward GRU's state ``b_t``.
        name: prefix of the parameter sites (``"<name>$params"``, ``"<name>_backward$params"``,
            ``"<name>_encoder_<modality>$params"``).
        latent_dim: size of ``z_t`` (default ``model.latent_dim`` or read from the model).
        min_var: floor of the factors' variances.
        conv_depth, embed_features: conv encoders of image modalities (as in
            :func:`inference.guides.filtering`).
        seed: initialisation of the networks.

    Returns:
        A NumPyro guide ``(obs, actions=None, mask=None, rewards=None)`` sampling ``"z_0"``
        ``(B, d)`` and ``"z"`` ``(T-1, B, d)`` and returning the path ``(B, T, d)``, carrying
        ``guide.backward_states(obs, actions=None, mask=None)`` -> ``b`` ``(B, T, backward_size)``
        (registers the parameter sites it uses) and ``guide.belief_posterior()`` (under
        ``handlers.substitute`` of the parameters; needs :class:`pssm.core.Dimensions`): the
        online factor of the module docstring, ``(s_t (B, s), obs_t, mask_t, first (B,)) ->
        (mu, sigma^2)``, what :func:`pssm.rssm.rssm`'s ``belief_step`` takes.
    """
    networks = GuideNetworks(
        name, hidden, min_var=min_var, conv_depth=conv_depth, embed_features=embed_features,
        seed=seed,
    )  # fmt: skip
    size = int(backward_size)

    def pieces(x, d):
        u = 0 if x.actions is None else x.actions.shape[-1]
        return smoothing_factor(networks, shapes(x), u, state_size(model, d, u), d, size)

    def backward_scan(inputs, cell):
        def step(b_next, x_t):
            b = cell(b_next, x_t)
            return b, b

        b_T = jnp.zeros((inputs.shape[0], size), inputs.dtype)
        _, b = jax.lax.scan(step, b_T, jnp.moveaxis(inputs, 1, 0), reverse=True)
        return jnp.moveaxis(b, 0, 1)  # (B, T, size); b[:, t] has seen steps t..T-1

    def actions_of(x):
        B, T = x.mask.shape[:2]
        return jnp.zeros((B, T, 0)) if x.actions is None else x.actions

    def guide(obs, actions=None, mask=None, rewards=None):  # rewards: scored by the model only
        x = guide_inputs(model, obs, actions, mask)
        B, T = x.mask.shape[:2]
        d = latent_size(model, latent_dim, obs, actions, mask)
        inputs, cell, factor = pieces(x, d)
        b = backward_scan(inputs(x.obs, x.mask, actions_of(x)), cell)
        seen = jnp.concatenate([b, first_flags(B, T)[..., None].astype(b.dtype)], axis=-1)
        return sample_states(model, factor, seen, x.actions, d)

    def backward_states(obs, actions=None, mask=None):
        """The backward GRU's states ``b`` ``(B, T, backward_size)`` of a batch."""
        x = guide_inputs(model, obs, actions, mask)
        d = latent_size(model, latent_dim, obs, actions, mask)
        inputs, cell, _ = pieces(x, d)
        return backward_scan(inputs(x.obs, x.mask, actions_of(x)), cell)

    def belief_posterior():
        require(model, Dimensions, "smoothing_rssm's belief_posterior")
        d = step_latent_size(model, latent_dim, "smoothing_rssm")
        u, dims = int(model.action_dim), model.obs_dims
        inputs, cell, factor = smoothing_factor(networks, dims, u, state_size(model, d, u), d, size)

        def posterior(state, obs, mask, first):
            """``(mu_t, sigma_t^2)`` with ``b_t = GRU_b(0, [e_t, m_t, 0])`` (module docstring)."""
            o, m = step_inputs(model, obs, mask)
            B = m.shape[0]
            x_t = inputs(o, m, jnp.zeros((B, u), state.dtype))
            b = cell(jnp.zeros((B, size), x_t.dtype), x_t)
            flag = jnp.asarray(first)[:, None].astype(b.dtype)
            return factor(state, jnp.concatenate([b, flag], axis=-1))

        return posterior

    guide.backward_states, guide.belief_posterior = backward_states, belief_posterior
    return guide
