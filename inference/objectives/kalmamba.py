"""KalMamba's objective (Becker, Freymuth & Neumann 2024, Sec. 2 and App. C, Eq. 2):

    L = -( ELBO(o_{<=T}, a_{<=T}) + E_q[log p(r_t | z_t)] ) + alpha R,
    R = sum_t (m_t - mu_t^+)^T (Sigma_t^+)^{-1} (m_t - mu_t^+),

the VRKN smoothing bound (rewards scored by the model) around any NumPyro ELBO plus the
Mahalanobis regulariser, which pulls the backbone's outputs ``m_t`` towards the filtered means.
The model is known only through ``model.regulariser(*args, detach=..., **kwargs)`` (``R`` per
sequence, of one forward pass; :func:`pssm.kalmamba.kalmamba` offers it). MC dropout follows the
models' site convention (:mod:`pssm.vrkn`, :mod:`pssm.kalmamba`): the masks are a latent site of
the forward pass, which the guide draws and the model replays; no key is handed to the model.
"""

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO
from numpyro.infer.elbo import ELBO

from pssm.core import Regularised, require

__all__ = ["KalMambaELBO"]


class KalMambaELBO(ELBO):
    """``-(ELBO) + alpha R``: KalMamba's objective (Sec. 2; Eq. 2) around any NumPyro ELBO (or
    :class:`inference.training.MetricsELBO` wrapper such as free nats).

    For one loss evaluation it runs the regulariser's forward pass under a ``seed`` handler (the
    second half of ``rng_key``), which draws the model's latent dropout site(s), then the inner
    ELBO (first half) with the guide's draws of those sites substituted by that pass's values:
    the guide draws them (with the same values), the model replays the guide, and the ELBO and
    ``alpha`` times the Mahalanobis regulariser ``R`` (summed over the batch, as the NumPyro ELBO
    sums its terms) see one set of MC-dropout masks. With ``detach_filter`` (default; the paper
    leaves this open) the regulariser moves ``m_t`` only, not the filtered belief. Whether masks
    are drawn at all is the model's choice (``kalmamba(mc_dropout=...)``).

    Metrics: ``"elbo"`` (of the inner ELBO), ``"mahalanobis"`` (``R`` summed over the batch),
    plus the inner wrapper's. Implements :class:`inference.training.MetricsELBO` and NumPyro's
    ``loss_with_mutable_state`` (usable with ``numpyro.infer.SVI``).
    """

    def __init__(self, elbo=None, *, alpha: float = 1.0, detach_filter=True):
        self.elbo = TraceMeanField_ELBO() if elbo is None else elbo
        super().__init__(num_particles=getattr(self.elbo, "num_particles", 1))
        self.alpha, self.detach_filter = float(alpha), detach_filter
        if hasattr(self.elbo, "init_aux"):  # forward the inner wrapper's own state
            self.init_aux = self.elbo.init_aux
            if hasattr(self.elbo, "update_aux"):
                self.update_aux = self.elbo.update_aux

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        require(model, Regularised, "KalMambaELBO")
        k_elbo, k_drop = jax.random.split(rng_key)
        model_kwargs = {k: v for k, v in kwargs.items() if k != "aux"}
        with (
            handlers.block(),
            handlers.substitute(data=param_map),
            handlers.trace() as tr,
            handlers.seed(rng_seed=k_drop),
        ):
            R = jnp.sum(model.regulariser(*args, detach=self.detach_filter, **model_kwargs))
        drawn = {
            name: site["value"]
            for name, site in tr.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        guide = handlers.substitute(guide, data=drawn)
        if hasattr(self.elbo, "loss_with_metrics"):
            out = self.elbo.loss_with_metrics(k_elbo, param_map, model, guide, *args, **kwargs)
            metrics = dict(out["metrics"])
        else:
            out = self.elbo.loss_with_mutable_state(
                k_elbo, param_map, model, guide, *args, **kwargs
            )
            metrics = {}
        metrics.setdefault("elbo", -out["loss"])
        metrics["mahalanobis"] = R
        return {
            "loss": out["loss"] + self.alpha * R,
            "metrics": metrics,
            "mutable_state": out.get("mutable_state"),
        }

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        out = self.loss_with_metrics(rng_key, param_map, model, guide, *args, **kwargs)
        return {"loss": out["loss"], "mutable_state": out["mutable_state"]}
