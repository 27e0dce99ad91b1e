"""The textbook linear-Gaussian SSM as a NumPyro program, any parameter fixed or learned.

    z_0 ~ N(m0, P0),   z_{t+1} ~ N(A z_t + B a_t, Q),   o_t ~ N(H z_t, R)

(time and batch conventions in :mod:`pssm.core`). Its latent path admits exact Kalman
inference, so every guide family can be checked against the exact ``log p(o)``; the VRKN
paper's Figure 2 compares the smoothing and filtering (RSSM) bounds on exactly this model.
"""

from collections.abc import Iterable

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from inference import kalman

from .core import (
    Structure,
    check_inputs,
    linear_gaussian,
    model_prior_conditionals,
    sample_latent_path,
)

_FORMS = ("full", "diagonal", "isotropic")


def _covariance(name: str, value, form: str, learn: bool):
    """A covariance matrix, learned in the given form or fixed."""
    value = jnp.asarray(value, dtype=float)
    d = value.shape[-1]
    if form not in _FORMS:
        raise ValueError(f"{name}_form must be one of {_FORMS}, got {form!r}")
    if not learn:
        return value
    if form == "full":
        return numpyro.param(name, value, constraint=constraints.positive_definite)
    if form == "diagonal":
        return jnp.diag(numpyro.param(name, jnp.diagonal(value), constraint=constraints.positive))
    scale = numpyro.param(name, jnp.mean(jnp.diagonal(value)), constraint=constraints.positive)
    return scale * jnp.eye(d)


def lgssm(
    A,
    Q,
    H,
    R,
    *,
    m0=None,
    P0=None,
    B=None,
    learn: Iterable[str] = (),
    Q_form: str = "full",
    R_form: str = "full",
):
    """Build a linear-Gaussian SSM model.

    Args:
        A, Q: ``(d, d)`` transition matrix and noise covariance (initial values if learned).
        H, R: ``(p, d)`` emission matrix and ``(p, p)`` noise covariance.
        m0, P0: prior of ``z_0`` (default ``0`` and ``I``).
        B: ``(d, u)`` control matrix (``None``: no actions).
        learn: names of the parameters to learn, among ``A, Q, H, R, m0, P0, B``; each becomes a
            ``numpyro.param`` site of that name.
        Q_form, R_form: ``"full"``, ``"diagonal"`` or ``"isotropic"`` (``sigma I``) for a
            learned covariance.

    Returns:
        ``model(obs, actions=None, mask=None)``: a NumPyro program with latent sites ``"z_0"``,
        ``"z"`` and observed site ``"obs"`` (``mask`` ``(B, T)`` marks observed steps), carrying
        ``model.structure`` for Kalman-based guides and an exact likelihood.
    """
    learn = set(learn)
    unknown = learn - {"A", "Q", "H", "R", "m0", "P0", "B"}
    if unknown:
        raise ValueError(f"unknown parameters to learn: {sorted(unknown)}")
    A, H = jnp.asarray(A, dtype=float), jnp.asarray(H, dtype=float)
    d, p = A.shape[0], H.shape[0]
    if A.shape != (d, d) or H.shape != (p, d):
        raise ValueError(f"A has shape {A.shape} and H {H.shape}: expected (d, d) and (p, d)")
    m0 = jnp.zeros(d) if m0 is None else jnp.asarray(m0, dtype=float)
    P0 = jnp.eye(d) if P0 is None else jnp.asarray(P0, dtype=float)
    u = None if B is None else jnp.shape(B)[1]

    def param(name, value):
        return numpyro.param(name, value) if name in learn else value

    def structure(obs, actions=None, mask=None) -> Structure:
        check_inputs(obs, actions if u else None, mask, obs_dim=p, action_dim=u)
        n, T = obs.shape[:2]
        batch = lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x)))
        A_ = param("A", A)
        Q_ = _covariance("Q", Q, Q_form, "Q" in learn)
        H_ = param("H", H)
        R_ = _covariance("R", R, R_form, "R" in learn)
        m0_ = param("m0", m0)
        P0_ = _covariance("P0", P0, "full", "P0" in learn)
        b = None
        if u is not None:
            if actions is None:
                raise ValueError("this model has a control matrix B: pass actions (B, T, u)")
            b = jnp.einsum("du,ntu->ntd", param("B", jnp.asarray(B, dtype=float)), actions[:, :-1])
        mask_ = None if mask is None else jnp.asarray(mask).astype(bool)
        return Structure(
            kalman.Gaussian(batch(m0_), batch(P0_)),
            kalman.Dynamics(batch(A_), b, batch(Q_)),
            kalman.Emissions(obs, batch(R_), mask_, batch(H_)),
        )

    @linear_gaussian(structure, exact=True)
    def model(obs, actions=None, mask=None):
        s = structure(obs, actions, mask)
        n = obs.shape[0]
        prior, conditionals = model_prior_conditionals(s)
        H_, R_ = s.emissions.H, s.emissions.R
        observed = jnp.ones(obs.shape[:2], bool) if mask is None else s.emissions.mask
        z = sample_latent_path(prior, conditionals)
        with numpyro.plate("batch", n):
            loc = jnp.einsum("npd,ntd->ntp", H_, z)
            clean = jnp.where(observed[..., None], obs, 0.0)  # missing entries may be NaN
            likelihood = dist.MultivariateNormal(loc, covariance_matrix=R_[:, None])
            numpyro.sample("obs", likelihood.mask(observed).to_event(1), obs=clean)
        return z

    return model
