"""The VSSF objective (Pfrommer et al., "Variational State-Space Filters", Eq. 3, as its code
``pfrommerd/variational_state_space_models`` estimates it): a Monte Carlo KL of the whole latent
path from many guide samples and the reconstruction from one of them. Written for L-VSSF
(:mod:`pssm.lvssf`) with the backward-sampling guide (:func:`inference.guides.
backward_sampling`), whose paths are cheap Kalman samples, but it reads models and guides only
as NumPyro programs sharing their latent sites.
"""

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.elbo import ELBO

__all__ = ["PathKLELBO", "path_kl_elbo"]


def _log_prob(site) -> jax.Array:
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value, site["intermediates"]) if site["intermediates"] else fn.log_prob(value)
    if site["scale"] is not None:
        lp = site["scale"] * lp
    return jnp.sum(lp)


def _latent_sites(tr) -> list[str]:
    return [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]


def path_kl_elbo(
    key: jax.Array, params: dict, model, guide, *args, num_kl_samples: int = 64, **kwargs
) -> tuple[jax.Array, dict]:
    """The VSSF objective (paper Eq. 3 as its code estimates it): ``loss = -(recon - KL)`` with

        KL    = 1/N sum_n [log q(z^n_{0:T-1} | o) - log p(z^n_{0:T-1} | a)],   z^n ~ q,
        recon = log p(o | z^1_{0:T-1})                     (one of the same N paths),

    for any NumPyro ``model`` and ``guide`` (here ``backward_sampling(model)``): ``log q`` sums
    the guide's sample sites, ``log p`` the model's sites of the same names (the latent
    path), ``recon`` the model's other (observed) sites. Many paths reduce the variance of the
    KL for the price of cheap Kalman samples; the decoder runs once. With ``N = 1`` this is
    one particle of ``Trace_ELBO``. Sums over the batch like NumPyro's ELBOs.

    Args:
        key: PRNG key.
        params: constrained parameter values by site name.
        model, guide: NumPyro programs sharing the latent sites.
        *args, **kwargs: their arguments (data).
        num_kl_samples: ``N``.

    Returns:
        ``(loss, metrics)`` with metrics ``elbo``, ``recon``, ``kl`` and ``kl_se`` (Monte Carlo
        standard error of ``KL``).
    """
    if num_kl_samples < 1:
        raise ValueError(f"num_kl_samples must be >= 1, got {num_kl_samples}")
    guide_key, model_key = jax.random.split(key)
    guide_ = handlers.substitute(guide, data=params)
    model_ = handlers.substitute(model, data=params)

    def draw(k):
        tr = handlers.trace(handlers.seed(guide_, k)).get_trace(*args, **kwargs)
        latent = {n: tr[n]["value"] for n in _latent_sites(tr)}
        if not latent:
            raise ValueError("the guide samples no latent sites")
        return latent, sum((_log_prob(tr[n]) for n in latent), jnp.zeros(()))

    def model_trace(latent):
        conditioned = handlers.condition(handlers.seed(model_, model_key), data=latent)
        tr = handlers.trace(conditioned).get_trace(*args, **kwargs)
        missing = [n for n in latent if n not in tr]
        model_only = _latent_sites(tr)
        if missing or model_only:
            raise ValueError(
                f"guide and model must share their latent sites: guide-only {missing}, "
                f"model-only {model_only}"
            )
        return tr

    latents, log_q = jax.vmap(draw)(jax.random.split(guide_key, num_kl_samples))
    # only the latent sites' densities leave the vmapped trace: under jit the batched decoder
    # is dead code and removed
    log_p = jax.vmap(lambda z: sum(_log_prob(s) for n, s in model_trace(z).items() if n in z))(
        latents
    )
    first = jax.tree.map(lambda x: x[0], latents)
    tr = model_trace(first)
    observed = [n for n, s in tr.items() if s["type"] == "sample" and n not in first]
    recon = sum((_log_prob(tr[n]) for n in observed), jnp.zeros(()))
    diff = log_q - log_p
    kl = jnp.mean(diff)
    se = jnp.std(diff) / np.sqrt(num_kl_samples) if num_kl_samples > 1 else jnp.zeros(())
    elbo = recon - kl
    return -elbo, {"elbo": elbo, "recon": recon, "kl": kl, "kl_se": se}


class PathKLELBO(ELBO):
    """:func:`path_kl_elbo` as a NumPyro ELBO reporting metrics (the
    ``inference.training.MetricsELBO`` protocol), for ``training.elbo_objective`` / ``fit``.

    Args:
        num_kl_samples: backward-sampled paths for the KL (the official code uses 1024).
    """

    def __init__(self, num_kl_samples: int = 64):
        if num_kl_samples < 1:
            raise ValueError(f"num_kl_samples must be >= 1, got {num_kl_samples}")
        super().__init__(num_particles=1)
        self.num_kl_samples = int(num_kl_samples)

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        loss, metrics = path_kl_elbo(
            rng_key, param_map, model, guide, *args, num_kl_samples=self.num_kl_samples, **kwargs
        )
        return {"loss": loss, "metrics": metrics, "mutable_state": None}

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        return self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)["loss"]
