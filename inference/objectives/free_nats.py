"""Free nats (Kingma et al. 2016; used by PlaNet, Dreamer and VRKN) and KL balancing (DreamerV2,
Hafner et al. 2021, Sec. 2.2; the KalMamba paper's Table 2 trains RSSM, VRKN and KalMamba with
both): an ELBO whose per-step KL of the latent path is clamped from below, so that steps already
below the budget receive no gradient towards the prior, and whose KL gradient is split between
prior and posterior in a chosen proportion."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from numpyro.distributions.kl import kl_divergence
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO

__all__ = ["FreeNatsELBO"]


def _log_prob_sum(site) -> jax.Array:
    return jnp.sum(scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"]))


def _stopped(fn):
    """The distribution ``fn`` with every parameter behind ``stop_gradient``."""
    return jax.tree.map(jax.lax.stop_gradient, fn)


class FreeNatsELBO(ELBO):
    """``TraceMeanField_ELBO`` with free nats: the analytic KL of the latent-path sites is
    clamped from below per element (VRKN, Dreamer; Kingma et al. 2016):

        loss = -( sum log p(o | z) - sum_{b,t} max(KL_{b,t}, free_nats) - other KLs )

    With ``balance = alpha`` the KL term is balanced (DreamerV2): each element contributes

        alpha max(KL(sg(q) || p), free_nats) + (1 - alpha) max(KL(q || sg(p)), free_nats),

    the same value as above, but the prior receives the fraction ``alpha`` of the KL gradient
    and the posterior ``1 - alpha`` (``sg`` = stop gradient; KalMamba paper, Table 2: 0.8 for
    the RSSM, 0.5 for VRKN and KalMamba). ``balance=None`` is the plain KL (both sides get the
    whole gradient).

    where ``KL_{b,t}`` is the KL of one sequence ``b`` and step ``t`` (a batch element of the
    sites ``kl_sites``, default ``"z_0"`` and ``"z"``: ``(B,)`` and ``(T-1, B)``). Below
    ``free_nats`` a step's KL receives no gradient. Other latent sites (e.g. VRKN's dropout
    masks) enter as in ``TraceMeanField_ELBO`` (analytic KL, else ``log p - log q``).
    ``free_nats=0`` is ``TraceMeanField_ELBO``. Implements the
    :class:`inference.training.MetricsELBO` protocol: metrics ``"elbo"`` (the unclamped bound),
    ``"kl"``, ``"log_likelihood"``.
    """

    def __init__(
        self,
        free_nats: float = 3.0,
        kl_sites: Sequence[str] = ("z_0", "z"),
        num_particles: int = 1,
        vectorize_particles: bool = True,
        balance: float | None = None,
    ):
        if free_nats < 0:
            raise ValueError(f"free_nats must be >= 0, got {free_nats}")
        if balance is not None and not 0.0 <= balance <= 1.0:
            raise ValueError(f"balance must lie in [0, 1] (or be None), got {balance}")
        self.free_nats = float(free_nats)
        self.balance = None if balance is None else float(balance)
        self.kl_sites = tuple(kl_sites)
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    def _particle(self, rng_key, param_map, model, guide, args, kwargs):
        model_key, guide_key = jax.random.split(rng_key)
        guide_trace = trace(substitute(seed(guide, guide_key), data=param_map)).get_trace(
            *args, **kwargs
        )
        replayed = replay(seed(model, model_key), guide_trace)
        model_trace = trace(substitute(replayed, data=param_map)).get_trace(*args, **kwargs)
        zero = jnp.zeros(())
        log_lik, kl, clamped, other = zero, zero, zero, zero
        for name, site in model_trace.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                log_lik = log_lik + _log_prob_sum(site)
                continue
            g = guide_trace[name]
            if name in self.kl_sites:
                kl_el = kl_divergence(g["fn"], site["fn"])
                kl = kl + jnp.sum(scale_and_mask(kl_el, g["scale"]))
                if self.balance is None:
                    floor = jnp.maximum(kl_el, self.free_nats)
                else:  # the same value; the gradient split between prior and posterior
                    to_prior = kl_divergence(_stopped(g["fn"]), site["fn"])
                    to_posterior = kl_divergence(g["fn"], _stopped(site["fn"]))
                    floor = self.balance * jnp.maximum(to_prior, self.free_nats) + (
                        1.0 - self.balance
                    ) * jnp.maximum(to_posterior, self.free_nats)
                clamped = clamped + jnp.sum(scale_and_mask(floor, g["scale"]))
                continue
            try:
                other = other + jnp.sum(
                    scale_and_mask(kl_divergence(g["fn"], site["fn"]), g["scale"])
                )
            except NotImplementedError:
                other = other + _log_prob_sum(g) - _log_prob_sum(site)
        for name, g in guide_trace.items():  # auxiliary guide sites: -log q
            if g["type"] == "sample" and not g["is_observed"] and name not in model_trace:
                other = other + _log_prob_sum(g)
        elbo = log_lik - kl - other
        return -(log_lik - clamped - other), elbo, kl, log_lik

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        def particle(key):
            return self._particle(key, param_map, model, guide, args, kwargs)

        if self.num_particles == 1:
            loss, elbo, kl, log_lik = particle(rng_key)
        else:
            keys = jax.random.split(rng_key, self.num_particles)
            out = self.vectorize_particles_fn(particle, keys)
            loss, elbo, kl, log_lik = (jnp.mean(v) for v in out)
        metrics = {"elbo": elbo, "kl": kl, "log_likelihood": log_lik}
        return {"loss": loss, "metrics": metrics, "mutable_state": None}

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        out = self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)
        return {"loss": out["loss"], "mutable_state": None}
