"""L-VSSF (Pfrommer et al., "Variational State-Space Filters") as a
:class:`rl.world_model.WorldModel`.

Nothing of the model is re-implemented here: the belief is the dense Kalman filter's
``N(m, P)`` over ``z``, its update (information-form fusion of the encoders' pseudo-observations
``Lambda_k mu_k(x)`` and any linear sensors) and its prior step ``z' = A z + B a + w`` are
:func:`pssm.lvssf.lvssf`'s belief step, turned into a world model by
:func:`rl.world_model.belief_world_model`. Training: the paper's path-KL objective
(:class:`inference.objectives.PathKLELBO`) with the backward-sampling guide.
"""

from collections.abc import Mapping

import numpy as np

from inference.guides import backward_sampling
from inference.objectives import PathKLELBO
from pssm.lvssf import lvssf

from ..world_model import ModelParts, WorldModel, from_parts

__all__ = ["lvssf_parts", "lvssf_world_model"]


def lvssf_parts(
    obs_dims,
    action_dim: int,
    *,
    latent_dim: int = 32,
    hidden=(128, 128),
    seed: int = 0,
    A=None,
    prior_cov=None,
    Sigma_w=None,
    learn=("A", "B", "Sigma_w"),
    num_kl_samples: int = 64,
    elbo=None,
    reward: bool = True,
    **model_kwargs,
) -> ModelParts:
    """An L-VSSF with vector sensors, its backward-sampling guide and ELBO
    (:func:`lvssf_world_model` makes the world model).

    Args:
        obs_dims: one vector's size or ``{modality: size}`` (vectors only, e.g. dm_control
            states).
        action_dim: ``u``.
        latent_dim, hidden: ``d`` and the encoder / decoder / reward-head widths (paper: GELU
            MLPs).
        seed: network initialisation.
        A, prior_cov, Sigma_w: initial ``A`` (default ``I``), the fixed stationary prior
            ``Sigma_z`` (default ``I``) and initial ``Sigma_w`` (default ``0.01 I``); ``B`` starts
            at 0. ``learn``: which of ``A, B, Sigma_w`` are learned (default all).
        num_kl_samples: paths of the Monte Carlo KL (ignored when ``elbo`` is given).
        elbo: the objective's ELBO (default ``PathKLELBO(num_kl_samples)``).
        reward: with a reward head (needed to act).
        **model_kwargs: further arguments of :func:`pssm.lvssf.lvssf`.
    """
    if isinstance(obs_dims, Mapping):
        obs_dims = {k: int(np.prod(v)) for k, v in obs_dims.items()}
    elif np.ndim(obs_dims):
        obs_dims = int(np.prod(obs_dims))
    d, u = int(latent_dim), int(action_dim)
    eye = np.eye(d)
    model = lvssf(
        obs_dims=obs_dims, A=eye if A is None else A,
        prior_cov=eye if prior_cov is None else prior_cov,
        Sigma_w=0.01 * eye if Sigma_w is None else Sigma_w,
        B=np.zeros((d, u)) if u else None, learn=tuple(k for k in learn if u or k != "B"),
        hidden=hidden, reward=reward, seed=seed, **model_kwargs,
    )  # fmt: skip
    return ModelParts(model, backward_sampling(model), elbo or PathKLELBO(num_kl_samples))


def lvssf_world_model(obs_dims, action_dim: int, **kwargs) -> WorldModel:
    """An L-VSSF with a reward head as a world model; arguments as :func:`lvssf_parts`."""
    return from_parts(lvssf_parts(obs_dims, action_dim, **kwargs))
