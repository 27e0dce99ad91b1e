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
(:class:`inference.guides.rssm_filtering.GuideNetworks`); a model without a deterministic path
uses ``[z_{t-1}, a_{t-1}]`` in place of ``h_t``. The backward state needs the whole sequence:
for online filtering use the filtering guide (or, as an approximation, ``b_t`` of a sequence
that ends at ``t``).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .rssm_filtering import (
    GuideNetworks,
    guide_inputs,
    latent_size,
    sample_states,
    shapes,
    state_size,
)


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
            :func:`inference.guides.rssm_filtering.rssm_filtering`).
        seed: initialisation of the networks.

    Returns:
        A NumPyro guide ``(obs, actions=None, mask=None, rewards=None)`` sampling ``"z_0"``
        ``(B, d)`` and ``"z"`` ``(T-1, B, d)`` and returning the path ``(B, T, d)``, carrying
        ``guide.backward_states(obs, actions=None, mask=None)`` -> ``b`` ``(B, T, backward_size)``
        (registers the parameter sites it uses) and the stepwise pieces ``guide.embedding(dims)``,
        ``guide.backward(in_features)`` (``(b_next, x_t) -> b_t``) and
        ``guide.posterior(in_features)`` (on ``[s_t, b_t, 1{t = 0}]``).
    """
    networks = GuideNetworks(
        name, hidden, min_var=min_var, conv_depth=conv_depth, embed_features=embed_features,
        seed=seed,
    )  # fmt: skip
    size = int(backward_size)

    def backward_inputs(x):
        e = networks.embedding(shapes(x))(x.obs, x.mask)
        B, T = x.mask.shape[:2]
        a = jnp.zeros((B, T, 0), e.dtype) if x.actions is None else x.actions.astype(e.dtype)
        return jnp.concatenate([e, x.mask.astype(e.dtype), a], axis=-1)  # (B, T, E + K + u)

    def backward_scan(x):
        inputs = backward_inputs(x)
        B = inputs.shape[0]
        gru = networks.backward(inputs.shape[-1], size)

        def step(b_next, x_t):
            b = gru(b_next, x_t)
            return b, b

        b_T = jnp.zeros((B, size), inputs.dtype)
        _, b = jax.lax.scan(step, b_T, jnp.moveaxis(inputs, 1, 0), reverse=True)
        return jnp.moveaxis(b, 0, 1)  # (B, T, size); b[:, t] has seen steps t..T-1

    def guide(obs, actions=None, mask=None, rewards=None):  # rewards: scored by the model only
        x = guide_inputs(model, obs, actions, mask)
        B, T = x.mask.shape[:2]
        d = latent_size(model, latent_dim, obs, actions, mask)
        b = backward_scan(x)
        flag = jnp.zeros((B, T, 1), b.dtype).at[:, 0].set(1.0)
        seen = jnp.concatenate([b, flag], axis=-1)
        u = 0 if x.actions is None else x.actions.shape[-1]
        net = networks.posterior(state_size(model, d, u) + seen.shape[-1], d)
        return sample_states(model, net, seen, x.actions, d)

    def backward_states(obs, actions=None, mask=None):
        """The backward GRU's states ``b`` ``(B, T, backward_size)`` of a batch."""
        return backward_scan(guide_inputs(model, obs, actions, mask))

    def backward(in_features: int):
        """The backward cell ``(b_{t+1}, [e_t, m_t, a_t]) -> b_t`` (its site registered)."""
        return networks.backward(int(in_features), size)

    def posterior(in_features: int):
        """The factor network on ``[s_t, b_t, 1{t = 0}]`` (``in_features`` entries)."""
        d = latent_dim or getattr(model, "latent_dim", None)
        if d is None:
            raise ValueError("pass latent_dim= to smoothing_rssm() to step its posterior network")
        return networks.posterior(int(in_features), int(d))

    guide.backward_states, guide.backward, guide.posterior = backward_states, backward, posterior
    guide.embedding = networks.embedding
    return guide
