"""Objective wrappers around ELBOs: rate-distortion splits, constrained optimisation (REWO),
KL annealing, free nats, the variational hierarchical prior (VHP) bound, the EKVAE's bound
(:class:`EKVAEBound`) and the VSSF's path-KL objective (:class:`PathKLELBO`).

Example (any NumPyro model and guide)::

    from inference import objectives, training

    elbo = objectives.ConstrainedELBO(objectives.TraceRateDistortion(), d0=None)
    objective = training.elbo_objective(model, guide, elbo)
    state, history = training.fit(objective, data, optax.adam(1e-3), num_steps=..., ...)
    history[-1]["lagrange_multiplier"], history[-1]["distortion"], history[-1]["rate"]
"""

from .constrained import (
    AnnealedELBO,
    AnnealState,
    ConstrainedELBO,
    RateDistortion,
    RateDistortionELBO,
    REWOState,
    TraceRateDistortion,
    encoder_decoder,
    f_lambda,
    gate_params,
    linear_warmup,
    update_multiplier,
)
from .ekvae import EKVAEBound
from .free_nats import FreeNatsELBO
from .kalmamba import KalMambaELBO
from .path_kl import PathKLELBO, path_kl_elbo
from .vhp import sample_posterior, vhp_bound

__all__ = [
    "AnnealState",
    "AnnealedELBO",
    "ConstrainedELBO",
    "EKVAEBound",
    "FreeNatsELBO",
    "PathKLELBO",
    "KalMambaELBO",
    "REWOState",
    "RateDistortion",
    "RateDistortionELBO",
    "TraceRateDistortion",
    "encoder_decoder",
    "f_lambda",
    "gate_params",
    "linear_warmup",
    "path_kl_elbo",
    "sample_posterior",
    "update_multiplier",
    "vhp_bound",
]
