"""Auxiliary-variable guide family (EKVAE, KVAE):

    q(a, z | o) = prod_t q_phi(a_t | o_t)  p(z_{0:T-1} | a_{0:T-1})     (EKVAE Eq. 13)

An amortised encoder proposes the auxiliary variables ``a_t`` from each observation; the latent
path is then drawn from the *exact* smoothing posterior of the model's latent LGSSM with the
sampled ``a`` as pseudo-observations, sampled forward through its smoothed dynamics (as
:func:`inference.guides.kalman_smoothing`). Since ``q(z | a) = p(z | a)``, the ELBO reduces to

    E_{q(a | o)}[log p(o | a) + log p(a) - log q(a | o)]  <=  log p(o),

where ``log p(a)`` is the Kalman marginal likelihood of the pseudo-observations; the only gap
left is ``KL(q(a | o) || p(a | o))``.

Protocols (what the guide reads of a model, nothing else; declared in :mod:`pssm.core`):

* :class:`pssm.core.AuxiliaryVariables`: ``model.structure(a, actions, mask)``, the latent
  LGSSM (:class:`pssm.core.Structure`) whose emissions are the auxiliary variables ``a``
  ``(B, T, p_a)``, declared with ``pssm.core.linear_gaussian``, its parameter sites shared
  with the model; ``model.auxiliary_site``, the name of the model's auxiliary sample site
  (e.g. ``"a"``), a ``(B, T, p_a)`` value inside ``numpyro.plate("batch", B)`` with event
  shape ``(T, p_a)``, masked like the observations.
* :class:`pssm.core.AuxiliarySizes`: ``model.auxiliary_dim`` (``p_a``) and ``model.obs_dim``
  (``p``), sizes for the default encoder (not needed when an encoder is given).

:func:`pssm.auxiliary.auxiliary_lgssm` is a model following it.
"""

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.contrib.module import nnx_module

from inference import kalman
from pssm.core import AuxiliarySizes, AuxiliaryVariables, require, sample_latent_path


class GaussianEncoder(nnx.Module):
    """``q(a_t | o_t) = N(mu(o_t), diag(sigma(o_t)^2))`` by an MLP, per time step.

    ``sigma = softplus(.) + min_scale`` keeps scales positive and away from zero.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64,),
        *,
        activation: Callable = nnx.tanh,
        min_scale: float = 1e-4,
        rngs: nnx.Rngs,
    ):
        sizes = [in_dim, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.out = nnx.Linear(sizes[-1], 2 * out_dim, rngs=rngs)
        self.activation, self.min_scale = activation, min_scale

    def __call__(self, o: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = o
        for layer in self.hidden:
            x = self.activation(layer(x))
        loc, raw = jnp.split(self.out(x), 2, axis=-1)
        return loc, jax.nn.softplus(raw) + self.min_scale


def auxiliary(
    model,
    *,
    encoder: nnx.Module | None = None,
    hidden: Sequence[int] = (64,),
    name: str = "aux_encoder",
    seed: int = 0,
    parallel: bool = False,
):
    """Guide: amortised ``q(a_t | o_t)``, then ``z ~ p(z | a)`` by Kalman smoothing.

    Args:
        model: an auxiliary-variable model (protocol in the module docstring).
        encoder: an NNX module mapping ``o`` ``(B, T, p)`` to ``(loc, scale)`` of ``a``, each
            ``(B, T, p_a)``. Default: a :class:`GaussianEncoder` with ``hidden`` layers, sized
            by ``model.obs_dim`` and ``model.auxiliary_dim``, initialised from ``seed``.
        name: site name of the encoder's parameters (``nnx_module``).
        parallel: run filter and smoother with ``lax.associative_scan``.

    Returns:
        ``guide(obs, actions=None, mask=None)`` sampling ``model.auxiliary_site``, ``"z_0"`` and
        ``"z"``. Steps with ``mask`` false carry no observation: their ``a_t`` (drawn from the
        encoder at a zero input) is masked out of the guide's density as of the model's, and
        the smoother treats the step as missing.
    """
    require(model, AuxiliaryVariables, "the auxiliary guide")
    site = model.auxiliary_site
    if encoder is None:
        require(model, AuxiliarySizes, "the auxiliary guide's default encoder (else pass encoder=)")
        encoder = GaussianEncoder(model.obs_dim, model.auxiliary_dim, hidden, rngs=nnx.Rngs(seed))

    def guide(obs, actions=None, mask=None):
        n, T = obs.shape[:2]
        if mask is not None and jnp.ndim(mask) != 2:
            raise ValueError(f"the auxiliary guide takes a per-step mask (B, T), got {mask.shape}")
        observed = jnp.ones((n, T), bool) if mask is None else jnp.asarray(mask).astype(bool)
        clean = jnp.where(observed[..., None], obs, 0.0)  # missing entries may be NaN
        loc, scale = nnx_module(name, encoder)(clean)
        with numpyro.plate("batch", n):
            q_a = dist.Normal(loc, scale).to_event(1).mask(observed).to_event(1)
            a = numpyro.sample(site, q_a)
        s = model.structure(a, actions, mask)
        post = jax.vmap(partial(kalman.smoother, parallel=parallel))(*s)
        forward = jax.vmap(kalman.smoothed_dynamics)(post)
        first = kalman.Gaussian(post.smoothed.mean[:, 0], post.smoothed.cov[:, 0])
        return sample_latent_path(first, forward)

    return guide
