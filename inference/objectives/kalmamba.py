"""KalMamba's objective (Becker, Freymuth & Neumann 2024, Sec. 2 and App. C, Eq. 2):

    L = -( ELBO(o_{<=T}, a_{<=T}) + E_q[log p(r_t | z_t)] ) + alpha R,
    R = sum_t (m_t - mu_t^+)^T (Sigma_t^+)^{-1} (m_t - mu_t^+),

the VRKN smoothing bound (rewards scored by the model) around any NumPyro ELBO plus the
Mahalanobis regulariser, which pulls the backbone's outputs ``m_t`` towards the filtered means.
The model is known only through ``model.regulariser(*args, detach=..., **kwargs)`` (``R`` per
sequence) and its ``dropout_key`` argument (:func:`pssm.kalmamba.kalmamba` offers both).
"""

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer import TraceMeanField_ELBO
from numpyro.infer.elbo import ELBO

__all__ = ["KalMambaELBO"]


class KalMambaELBO(ELBO):
    """``-(ELBO) + alpha R``: KalMamba's objective (Sec. 2; Eq. 2) around any NumPyro ELBO (or
    :class:`inference.training.MetricsELBO` wrapper such as free nats).

    For one loss evaluation it draws one dropout key (``mc_dropout=True``) and hands it to model
    and guide as ``dropout_key`` (so the smoothing guide and the prior use the same MC-dropout
    dynamics), then adds ``alpha`` times the Mahalanobis regulariser of the same forward pass,
    summed over the batch, as the NumPyro ELBO sums its terms. With ``detach_filter`` (default;
    the paper leaves this open) the regulariser moves ``m_t`` only, not the filtered belief.

    Metrics: ``"elbo"`` (of the inner ELBO), ``"mahalanobis"`` (``R`` summed over the batch),
    plus the inner wrapper's. Implements :class:`inference.training.MetricsELBO` and NumPyro's
    ``loss_with_mutable_state`` (usable with ``numpyro.infer.SVI``).
    """

    def __init__(
        self, elbo=None, *, alpha: float = 1.0, mc_dropout: bool = True, detach_filter=True
    ):
        self.elbo = TraceMeanField_ELBO() if elbo is None else elbo
        super().__init__(num_particles=getattr(self.elbo, "num_particles", 1))
        self.alpha, self.mc_dropout, self.detach_filter = float(alpha), mc_dropout, detach_filter
        if hasattr(self.elbo, "init_aux"):  # forward the inner wrapper's own state
            self.init_aux = self.elbo.init_aux
            if hasattr(self.elbo, "update_aux"):
                self.update_aux = self.elbo.update_aux

    def loss_with_metrics(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        if not hasattr(model, "regulariser"):
            raise TypeError("KalMambaELBO needs a KalMamba model (with `model.regulariser`)")
        k_elbo, k_drop = jax.random.split(rng_key)
        if self.mc_dropout:
            kwargs = {**kwargs, "dropout_key": k_drop}
        if hasattr(self.elbo, "loss_with_metrics"):
            out = self.elbo.loss_with_metrics(k_elbo, param_map, model, guide, *args, **kwargs)
            metrics = dict(out["metrics"])
        else:
            out = self.elbo.loss_with_mutable_state(
                k_elbo, param_map, model, guide, *args, **kwargs
            )
            metrics = {}
        kwargs.pop("aux", None)
        with handlers.block(), handlers.substitute(data=param_map):
            R = jnp.sum(model.regulariser(*args, detach=self.detach_filter, **kwargs))
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
