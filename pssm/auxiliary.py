"""A linear-Gaussian SSM observed through auxiliary variables (the EKVAE / KVAE layout).

    z_0 ~ N(m0, P0),   z_{t+1} ~ N(A z_t + B u_t, Q),        (latent LGSSM, as pssm.lgssm)
    a_t ~ N(H z_t, R),                                       (auxiliary variables, site "a")
    o_t ~ N(C a_t, S)   or   o_t ~ N(f(a_t), S)              (linear or MLP decoder)

(Klushyn et al., 2021, "Latent Matters", Eqs. 11-12; Fraccaro et al., 2017, KVAE). The latent
path is Gaussian given the auxiliary variables, so a guide samples ``a`` from an amortised
encoder ``q(a_t | o_t)`` and then ``z`` exactly from ``p(z | a_{0:T-1})`` by Kalman smoothing
(:func:`inference.guides.auxiliary`). The protocols that guide reads
(:class:`pssm.core.AuxiliaryVariables`, :class:`pssm.core.AuxiliarySizes`):
``model.structure(a, actions, mask)`` gives the latent LGSSM with ``a`` as
pseudo-observations, and ``model.auxiliary_site`` / ``model.auxiliary_dim`` /
``model.obs_dim`` name and size the sites.

With the linear decoder, ``a`` integrates out in closed form: ``o`` is itself an LGSSM with

    H' = C H,   R' = C R C^T + S,

so the exact ``log p(o)`` exists (:func:`marginal_log_likelihood`, via
``model.marginal_structure``), offered as ``model.exact_log_likelihood``
(:class:`pssm.core.ExactLikelihood`), and every ELBO can be checked against it.
"""

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.module import nnx_module

from inference import kalman

from . import nets
from .core import (
    Structure,
    check_inputs,
    linear_gaussian,
    model_prior_conditionals,
    sample_latent_path,
)
from .lgssm import _covariance, lgssm

_LATENT = {"A", "Q", "H", "R", "m0", "P0", "B"}


def auxiliary_lgssm(
    A,
    Q,
    H,
    R,
    *,
    C=None,
    S=None,
    decoder: str = "linear",
    obs_dim: int | None = None,
    hidden: Sequence[int] = (64,),
    m0=None,
    P0=None,
    B=None,
    learn: Iterable[str] = (),
    Q_form: str = "full",
    R_form: str = "full",
    S_form: str = "full",
    seed: int = 0,
    auxiliary_site: str = "a",
    decoder_name: str = "decoder",
):
    """Build the auxiliary-variable LGSSM.

    Args:
        A, Q, H, R, m0, P0, B: the latent LGSSM and the auxiliary emissions ``a_t ~ N(H z_t,
            R)``, exactly as in :func:`pssm.lgssm.lgssm` (``H`` is ``(p_a, d)``).
        C: ``(p, p_a)`` decoder matrix of the linear decoder (initial value if learned).
        S: ``(p, p)`` observation noise covariance (default ``0.01 I``; initial value if
            learned).
        decoder: ``"linear"`` (``o_t ~ N(C a_t, S)``; exact likelihood available) or ``"mlp"``
            (``o_t ~ N(f(a_t), S)`` with ``f`` a :class:`pssm.nets.MLP` (tanh) registered as
            ``decoder_name`` through ``nnx_module``; always learned).
        obs_dim: ``p`` for the MLP decoder (the linear one reads it from ``C``).
        hidden: hidden layer sizes of the MLP decoder.
        learn: parameters to learn, among ``A, Q, H, R, m0, P0, B, C, S`` (``numpyro.param``
            sites of those names).
        Q_form, R_form, S_form: ``"full"``, ``"diagonal"`` or ``"isotropic"`` for a learned
            covariance.
        seed: initialisation seed of the MLP decoder.
        auxiliary_site: name of the auxiliary sample site.

    Returns:
        ``model(obs, actions=None, mask=None)`` with latent sites ``"z_0"``, ``"z"``,
        ``auxiliary_site`` (``(B, T, p_a)``, plate ``"batch"``) and observed site ``"obs"``
        (steps with ``mask`` false contribute neither ``a`` nor ``o``: ``a_t`` of a missing
        step is a leaf whose density integrates to one). It carries ``structure(a, actions,
        mask)``, ``auxiliary_site``, ``auxiliary_dim``, ``obs_dim`` and, for the linear
        decoder, ``marginal_structure(obs, actions, mask)`` and ``exact_log_likelihood(params,
        obs, actions, mask)`` (:func:`marginal_log_likelihood`).
    """
    learn = set(learn)
    unknown = learn - _LATENT - {"C", "S"}
    if unknown:
        raise ValueError(f"unknown parameters to learn: {sorted(unknown)}")
    if decoder not in ("linear", "mlp"):
        raise ValueError(f"decoder must be 'linear' or 'mlp', got {decoder!r}")
    latent = lgssm(
        A, Q, H, R, m0=m0, P0=P0, B=B, learn=learn & _LATENT, Q_form=Q_form, R_form=R_form
    )
    p_a = jnp.shape(H)[0]
    if decoder == "linear":
        if C is None:
            raise ValueError("the linear decoder needs C (p, p_a)")
        C = jnp.asarray(C, dtype=float)
        if C.ndim != 2 or C.shape[1] != p_a:
            raise ValueError(f"C has shape {C.shape}, expected (p, {p_a})")
        p = C.shape[0]
        if obs_dim is not None and obs_dim != p:
            raise ValueError(f"obs_dim={obs_dim} disagrees with C's {p} rows")
        if "C" in learn:
            C_value = C
            decode = lambda a: jnp.einsum("pa,nta->ntp", numpyro.param("C", C_value), a)
        else:
            decode = lambda a: jnp.einsum("pa,nta->ntp", C, a)
    else:
        if obs_dim is None:
            raise ValueError("the MLP decoder needs obs_dim")
        if "C" in learn or C is not None:
            raise ValueError("C belongs to the linear decoder")
        p = obs_dim
        net = nets.MLP(p_a, hidden, p, activation=nnx.tanh, rngs=nnx.Rngs(seed))
        decode = lambda a: nnx_module(decoder_name, net)(a)
    S = 0.01 * jnp.eye(p) if S is None else jnp.asarray(S, dtype=float)
    u = None if B is None else jnp.shape(B)[1]

    def latent_part(n, T, dtype, actions, mask) -> Structure:
        """The latent LGSSM's parameters (its emissions' ``w`` is a placeholder)."""
        return latent.structure(jnp.zeros((n, T, p_a), dtype), actions, mask)

    def model(obs, actions=None, mask=None):
        check_inputs(obs, actions if u else None, mask, obs_dim=p)
        n, T = obs.shape[:2]
        s = latent_part(n, T, obs.dtype, actions, mask)
        prior, conditionals = model_prior_conditionals(s)
        observed = jnp.ones((n, T), bool) if mask is None else s.emissions.mask
        S_ = _covariance("S", S, S_form, "S" in learn)
        z = sample_latent_path(prior, conditionals)
        with numpyro.plate("batch", n):
            loc = jnp.einsum("npd,ntd->ntp", s.emissions.H, z)
            p_a_z = dist.MultivariateNormal(loc, covariance_matrix=s.emissions.R[:, None])
            a = numpyro.sample(auxiliary_site, p_a_z.mask(observed).to_event(1))
            clean = jnp.where(observed[..., None], obs, 0.0)  # missing entries may be NaN
            p_o_a = dist.MultivariateNormal(decode(a), covariance_matrix=S_)
            numpyro.sample("obs", p_o_a.mask(observed).to_event(1), obs=clean)
        return z

    model = linear_gaussian(latent.structure, exact=False)(model)
    model.auxiliary_site = auxiliary_site
    model.auxiliary_dim = p_a
    model.obs_dim = p
    if decoder == "linear":

        def marginal_structure(obs, actions=None, mask=None) -> Structure:
            """The LGSSM of ``o`` with ``a`` integrated out: ``H' = C H``, ``R' = C R C^T + S``."""
            check_inputs(obs, actions if u else None, mask, obs_dim=p)
            n, T = obs.shape[:2]
            s = latent_part(n, T, obs.dtype, actions, mask)
            C_ = numpyro.param("C", C) if "C" in learn else C
            S_ = _covariance("S", S, S_form, "S" in learn)
            H_ = jnp.einsum("pa,nad->npd", C_, s.emissions.H)
            R_ = jnp.einsum("pa,nab,qb->npq", C_, s.emissions.R, C_) + S_
            return Structure(s.prior, s.dynamics, kalman.Emissions(obs, R_, s.emissions.mask, H_))

        model.marginal_structure = marginal_structure
        model.exact_log_likelihood = partial(marginal_log_likelihood, model)
    return model


def marginal_log_likelihood(model: Callable, params: dict, *args, **kwargs) -> jax.Array:
    """``log p(obs)`` per sequence, ``(B,)``, of a model carrying ``marginal_structure`` (e.g.
    :func:`auxiliary_lgssm` with the linear decoder), parameters substituted from ``params``
    (constrained values, as returned by ``Objective.constrain``)."""
    if not hasattr(model, "marginal_structure"):
        raise ValueError(
            "the model has no marginal_structure (an MLP decoder has no exact likelihood)"
        )
    with numpyro.handlers.block(), numpyro.handlers.substitute(data=params):
        s = model.marginal_structure(*args, **kwargs)
    return jax.vmap(lambda *x: kalman.filter(*x).log_likelihood)(*s)
