"""The small protocol between models and guides, and the latent-path sampler they share.

Batch and time conventions (all models): observations ``obs`` are ``(B, T, p)`` (``B``
sequences of ``T`` steps), actions ``(B, T, u)`` with ``a_t`` the action taken *after*
observing ``o_t`` (so ``a_t`` drives ``z_t -> z_{t+1}``; the last one is unused by the
dynamics), masks ``(B, T)`` (per step) or ``(B, T, K)`` (per sensor). The latent path is
sampled at two sites with stable names that every guide targets:

    "z_0": z_0, shape (B, d)                   inside the plate "batch"
    "z":   z_{1:T-1}, shape (T-1, B, d)         one site per step inside a NumPyro ``scan``
                                                (absent when T = 1: a path of z_0 alone)

Models that admit closed-form inference of ``z`` carry a ``structure`` function (attached with
:func:`linear_gaussian`) returning the latent linear-Gaussian SSM of a batch as a
:class:`Structure` (``inference.kalman`` containers with a leading batch axis). A guide calls
``model.structure(...)``; its ``numpyro.param`` / Flax-module sites have the same names as the
model's, so model and guide share them.

Everything else inference may read of a model is declared as a ``typing.Protocol`` in
:mod:`pssm.protocols` and re-exported here (:class:`LinearGaussian`, :class:`ExactLikelihood`,
:class:`AuxiliaryVariables`, :class:`AuxiliarySizes`, :class:`FlatAuxiliary`,
:class:`AuxiliaryBound`, :class:`DeterministicPath`, :class:`Dimensions`,
:class:`Preprocessed`, :class:`Regularised`, and :func:`require`, the check with a clear error).
Nothing else of a model is visible to a guide or objective.

Models that can act carry ``model.belief_step()`` returning a :class:`BeliefStep` (declared in
:mod:`pssm.belief`, re-exported here): the online filter agents call, built from the same step
functions the model's program scans for its filtered beliefs.
"""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.experimental import checkify
from numpyro.contrib.control_flow import scan

from inference import kalman
from inference.kalman._validate import check_mask

# the protocols a model offers, in one place
from .belief import Belief, BeliefStep  # noqa: F401
from .protocols import (  # noqa: F401
    ActingModel,
    AuxiliaryBound,
    AuxiliarySizes,
    AuxiliaryVariables,
    DeterministicPath,
    Dimensions,
    ExactLikelihood,
    FlatAuxiliary,
    LinearGaussian,
    Preprocessed,
    Regularised,
    require,
)


class Structure(NamedTuple):
    """The latent LGSSM of a batch: ``kalman`` containers with leading batch axis ``B``."""

    prior: kalman.Gaussian
    dynamics: kalman.Dynamics
    emissions: kalman.Emissions


def linear_gaussian(
    structure: Callable[..., Structure], *, exact: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator: declare that a model's latent path admits closed-form (Kalman) inference.

    ``structure`` takes the model's arguments and returns its :class:`Structure`, creating its
    parameters with the same site names as the model::

        @linear_gaussian(my_structure)
        def my_model(obs, actions=None, mask=None): ...

    ``exact=True`` declares that the structure's emissions *are* the model's observation
    likelihood (a textbook LGSSM), so the Kalman log-likelihood is the model's exact
    ``log p(obs)``: the model then offers :class:`ExactLikelihood`
    (``model.exact_log_likelihood(params, ...)``, :func:`exact_log_likelihood`).
    """

    def attach(model: Callable) -> Callable:
        model.structure = structure
        model.exact = exact
        if exact:
            model.exact_log_likelihood = partial(exact_log_likelihood, model)
        return model

    return attach


def gaussian(mean: jax.Array, cov: jax.Array) -> dist.Distribution:
    """``N(mean, cov)`` as a NumPyro distribution with event ``(d,)``: diagonal if ``cov`` has
    ``mean``'s shape (a variance vector), else a full covariance."""
    if cov.shape == mean.shape:
        return dist.Normal(mean, jnp.sqrt(cov)).to_event(1)
    return dist.MultivariateNormal(mean, covariance_matrix=cov)


def _apply(A, z):
    return A * z if A.shape == z.shape else jnp.einsum("...ij,...j->...i", A, z)


def sample_latent_path(
    initial: kalman.Gaussian, conditionals: kalman.LinearGaussian, *, reverse: bool = False
) -> jax.Array:
    """Sample the sites ``"z_0"`` and ``"z"`` of a Gauss-Markov chain over a batch.

    Args:
        initial: ``(B, d)`` means and covariances of ``z_0`` (forward) or of ``z_{T-1}``
            (``reverse``).
        conditionals: affine-Gaussian conditionals with leading axes ``(B, T-1)``:
            ``z_{t+1} | z_t`` forward, or ``z_t | z_{t+1}`` with ``reverse`` (backward
            sampling, as in the VSSF guide).

    Returns:
        The path ``(B, T, d)``. Call it outside any plate: it opens ``numpyro.plate("batch", B)``
        around each site itself (NumPyro's ``scan`` cannot run under a plate). With ``T = 1``
        (empty conditionals) the path is ``z_0 ~ initial`` alone and there is no site ``"z"``
        (no transition).
    """
    to_time = lambda x: jnp.moveaxis(x, 1, 0)
    A, b, Q = (to_time(x) for x in conditionals)
    n = initial.mean.shape[0]
    if A.shape[0] == 0:
        # T = 1: z_0 alone; in either direction ``initial`` is its distribution. No site "z":
        # NumPyro's ``scan`` cannot replay a length-0 site, and its log-densities and KLs fail
        # on empty batches, so there is nothing to score rather than an empty site.
        with numpyro.plate("batch", n):
            z0 = numpyro.sample("z_0", gaussian(*initial))
        return z0[:, None]

    def step(z_prev, params):
        A_t, b_t, Q_t = params
        with numpyro.plate("batch", n):
            z = numpyro.sample("z", gaussian(_apply(A_t, z_prev) + b_t, Q_t))
        return z, z

    if not reverse:
        with numpyro.plate("batch", n):
            z0 = numpyro.sample("z_0", gaussian(*initial))
        _, zs = scan(step, z0, (A, b, Q))
        return jnp.concatenate([z0[:, None], to_time(zs)], axis=1)
    # reverse: "z" covers t = T-1 .. 1; its first (last-in-time) element draws z_{T-1} from
    # ``initial`` (an affine conditional with zero gain), then t = T-2 .. 1 condition on z_{t+1}.
    zero = jnp.zeros_like(initial.cov)
    A_r = jnp.concatenate([A[1:], zero[None]])
    b_r = jnp.concatenate([b[1:], initial.mean[None]])
    Q_r = jnp.concatenate([Q[1:], initial.cov[None]])
    _, zs = scan(step, jnp.zeros_like(initial.mean), (A_r, b_r, Q_r), reverse=True)
    with numpyro.plate("batch", n):
        z0 = numpyro.sample("z_0", gaussian(_apply(A[0], zs[0]) + b[0], Q[0]))
    return jnp.concatenate([z0[:, None], to_time(zs)], axis=1)


def model_prior_conditionals(structure: Structure) -> tuple[kalman.Gaussian, kalman.Dynamics]:
    """The prior chain ``(p(z_0), p(z_{t+1} | z_t))`` of a structure, time-varying ``(B, T-1)``."""
    prior, dyn, em = structure
    B, T = em.w.shape[:2]
    d = prior.mean.shape[-1]
    stat = prior.cov.shape[1:]
    tv = lambda x, n: (
        x if x.ndim == 2 + n else jnp.broadcast_to(x[:, None], (B, T - 1, *x.shape[1:]))
    )
    A, Q = tv(dyn.A, len(stat)), tv(dyn.Q, len(stat))
    b = jnp.zeros((B, T - 1, d), prior.mean.dtype) if dyn.b is None else tv(dyn.b, 1)
    return prior, kalman.Dynamics(A, b, Q)


def check_inputs(obs, actions=None, mask=None, *, obs_dim=None, action_dim=None) -> None:
    """Clear errors for bad data, before any training step.

    Shapes always; values (NaN/inf in observations not marked missing by ``mask`` or in
    actions, a mask that is not boolean or 0/1) when the data are concrete (outside ``jit``).
    Under a trace the value checks are staged for :func:`inference.kalman.checked`, which runs
    them inside the compiled function; without it they cost nothing.
    """
    obs_shape = jnp.shape(obs)
    if len(obs_shape) < 3:
        raise ValueError(f"obs has shape {obs_shape}, expected (batch, time, features...)")
    B, T = obs_shape[:2]
    if obs_dim is not None and obs_shape[2:] != tuple(np.atleast_1d(obs_dim)):
        raise ValueError(f"obs has shape {obs_shape}, expected (batch, time, {obs_dim})")
    if actions is not None:
        a_shape = jnp.shape(actions)
        if len(a_shape) != 3 or a_shape[:2] != (B, T):
            raise ValueError(
                f"actions have shape {a_shape}, expected ({B}, {T}, action_dim) "
                f"to match obs {obs_shape}"
            )
        if action_dim is not None and a_shape[2] != action_dim:
            raise ValueError(f"actions have shape {a_shape}, expected last axis {action_dim}")
    if mask is not None:
        m_shape = jnp.shape(mask)
        if m_shape[:2] != (B, T) or len(m_shape) > 3:
            raise ValueError(f"mask has shape {m_shape}, expected ({B}, {T}) or ({B}, {T}, K)")
        check_mask("mask", mask)
    # Values: read when concrete; a traced obs or mask (inside Predictive or jit) cannot be read,
    # so the check is staged instead, run by inference.kalman.checked and a no-op otherwise.
    concrete = not any(isinstance(x, jax.core.Tracer) for x in (obs, mask))
    xp = np if concrete else jnp
    o = xp.asarray(obs)
    bad = ~xp.isfinite(o)
    if mask is not None:
        m = xp.asarray(mask).astype(bool)
        if m.ndim == 3:  # per sensor: a step counts as observed if any sensor is
            m = m.any(-1)
        bad &= xp.broadcast_to(m.reshape(m.shape + (1,) * (o.ndim - 2)), o.shape)
    if not concrete:
        checkify.debug_check(
            ~jnp.any(bad), "obs contains NaN/inf where the mask does not mark it missing"
        )
    elif bad.any():
        b, t = np.argwhere(bad)[0][:2]
        raise ValueError(
            f"obs contains NaN/inf at sequence {b}, step {t} where the mask "
            "does not mark it missing"
        )
    if actions is not None:
        if isinstance(actions, jax.core.Tracer):
            checkify.debug_check(
                jnp.all(jnp.isfinite(actions)), "actions contain NaN or infinite values"
            )
        elif not np.all(np.isfinite(np.asarray(actions))):
            raise ValueError("actions contain NaN or infinite values")


def exact_log_likelihood(model: Callable, params: dict, *args, **kwargs) -> jax.Array:
    """``log p(obs)`` per sequence, ``(B,)``, of a model declared ``linear_gaussian(exact=True)``,
    with its parameters substituted from ``params`` (constrained values)."""
    if not getattr(model, "exact", False):
        raise ValueError("the model has no exact likelihood (declare linear_gaussian(exact=True))")
    with numpyro.handlers.block(), numpyro.handlers.substitute(data=params):
        s = model.structure(*args, **kwargs)
    return jax.vmap(lambda *x: kalman.filter(*x).log_likelihood)(*s)
