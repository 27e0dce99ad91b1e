"""The EKVAE's bound (Klushyn et al. 2021, "Latent Matters", Eqs. 15-18) as a training objective.

    log p(x) >= E_{q(a|x)}[sum_t log p(x_t | a_t) - sum_t log q(a_t | x_t) + L(a)],

``L(a) <= log p(a)`` computed by the model (``model.bound``: the extended Kalman filter and
smoother of :mod:`pssm.extended_kalman`, the ``z_{t-1}`` Monte Carlo term, the VHP's bound on
``log p(z_0)``). Distortion ``D = -sum_t log p(x_t | a_t)`` (Eq. 15; with a reward head also
``-sum_t log p(r_t | z_{t+1})`` at the bound's ``z`` sample), rate ``R`` the rest, so the bound
trains as is or under :class:`inference.objectives.ConstrainedELBO` (REWO) / ``AnnealedELBO``.
The model is read through :class:`pssm.core.AuxiliaryBound` only (``bound``,
``auxiliary_site``).
"""

import jax
import jax.numpy as jnp
from numpyro import handlers

from pssm.core import AuxiliaryBound, require

from .constrained import RateDistortionELBO
from .vhp import vhp_bound

__all__ = ["EKVAEBound"]


class EKVAEBound(RateDistortionELBO):
    """The EKVAE's bound (Eqs. 15-18) as a :class:`inference.objectives.RateDistortion`.

    ``a ~ q(a | x)`` comes from ``guide.auxiliary_posterior``
    (:func:`inference.guides.ekvae_guide`) or else from the guide's auxiliary site (any guide
    with one; the rest of such a guide is traced and then compiled away), scored by
    ``log q(a | x)``; the rest is ``model.bound``.

    Args:
        num_particles: independent ``(a, z)`` samples averaged.
        posterior: ``"smoother"`` (Eq. 17) or ``"filter"`` (App. A.6).
        analytic: closed-form KLs where they exist.
        scale: multiplies ``D`` and ``R`` (e.g. ``N / B`` for a minibatch estimate of the
            full-data bound).
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        posterior: str = "smoother",
        analytic: bool = True,
        scale: float = 1.0,
    ):
        if posterior not in ("smoother", "filter"):
            raise ValueError(f"posterior must be 'smoother' or 'filter', got {posterior!r}")
        super().__init__(num_particles=num_particles)
        self.posterior, self.analytic, self.scale = posterior, analytic, scale

    def rate_distortion(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        require(model, AuxiliaryBound, "EKVAEBound")
        site = model.auxiliary_site

        def particle(key):
            k_guide, k_bound = jax.random.split(key)
            if hasattr(guide, "auxiliary_posterior"):
                with handlers.block(), handlers.substitute(data=param_map):
                    q = guide.auxiliary_posterior(*args, **kwargs)
                a = q.rsample(k_guide)
                log_q = jnp.sum(q.log_prob(a))
            else:
                with handlers.block():
                    seeded = handlers.seed(handlers.substitute(guide, data=param_map), k_guide)
                    tr = handlers.trace(seeded).get_trace(*args, **kwargs)
                a = tr[site]["value"]
                log_q = jnp.sum(tr[site]["fn"].log_prob(a))
            with handlers.block(), handlers.substitute(data=param_map):
                out = model.bound(k_bound, a, *args, posterior=self.posterior,
                                  analytic=self.analytic, prior_bound=vhp_bound,
                                  **kwargs)  # fmt: skip
            return {"distortion": out["distortion"], "rate": log_q - out["log_p_a"],
                    "rate_initial": -out["initial"], "rate_transition": -out["transition"],
                    "posterior_kl": out["posterior_kl"], "log_q_a": log_q,
                    "reward_nll": out["reward_nll"]}  # fmt: skip

        keys = jax.random.split(rng_key, self.num_particles)
        out = jax.tree.map(lambda x: self.scale * jnp.mean(x, 0), jax.vmap(particle)(keys))
        D, R = out.pop("distortion"), out.pop("rate")
        return {"distortion": D, "rate": R, "metrics": out}
