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

import jax.numpy as jnp
import numpyro
from flax import nnx
from numpyro.distributions import constraints

from inference import kalman

from . import nets
from .core import Structure, linear_gaussian, model_prior_conditionals, sample_latent_path
from .inputs import (
    Inputs,
    fuse,
    gaussian_observations,
    modalities,
    observation_sites,
    prepare_inputs,
)


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
