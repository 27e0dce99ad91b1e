"""The EKVAE (Klushyn et al. 2021, "Latent Matters") as a :class:`rl.world_model.WorldModel`.

Nothing of the model is re-implemented here: the belief is the extended Kalman filter's
``N(m, P)`` over ``z``, conditioned on the auxiliary variable ``a_t`` the encoder of
``q(a_t | x_t)`` gives (its mean) and predicted through the action with the learned local
linearisation ``[F, B, Q](m, u)``: :func:`pssm.ekvae.ekvae`'s belief step, given the guide's
encoder, turned into a world model by :func:`rl.world_model.belief_world_model`. Training: the
paper's bound (:class:`inference.objectives.EKVAEBound`, rewards in the distortion) with the
recognition model :func:`inference.guides.ekvae_guide`.
"""

from collections.abc import Mapping

import numpy as np

from inference.guides import ekvae_guide
from inference.objectives import EKVAEBound
from pssm.ekvae import ekvae

from ..world_model import ModelParts, WorldModel, from_parts

__all__ = ["ekvae_parts", "ekvae_world_model"]


def ekvae_parts(
    obs_dims,
    action_dim: int,
    *,
    latent_dim: int = 16,
    hidden=(128,),
    seed: int = 0,
    aux_dim: int | None = None,
    num_bases: int = 8,
    likelihood: str = "gaussian",
    elbo=None,
    reward: bool = True,
    **model_kwargs,
) -> ModelParts:
    """An EKVAE with its recognition model and bound (:func:`ekvae_world_model` makes the world
    model).

    Args:
        obs_dims: one vector's size or ``{modality: size}`` (vectors only, e.g. dm_control
            states; a dict is concatenated in key order).
        action_dim: ``u``.
        latent_dim: ``D_z``; ``aux_dim``: ``D_a`` (default ``latent_dim // 2``, at least 1;
            ``H`` the rectangular identity, Eq. 14).
        hidden: hidden sizes of the decoder, the encoder, the transition's ``g`` and the
            reward head (an int: one layer).
        seed: network initialisation (the encoder: ``seed + 1``).
        num_bases: ``M`` base matrices.
        likelihood: ``"gaussian"`` for state vectors (``"bernoulli"`` for intensities).
        elbo: the objective's ELBO (default :class:`inference.objectives.EKVAEBound`; the
            paper's constrained training: ``ConstrainedELBO(EKVAEBound())``).
        reward: with a reward head (needed to act).
        **model_kwargs: further arguments of :func:`pssm.ekvae.ekvae`.
    """
    if isinstance(obs_dims, Mapping):
        obs_dims = {k: int(np.prod(v)) for k, v in obs_dims.items()}
    elif np.ndim(obs_dims):
        obs_dims = int(np.prod(obs_dims))
    widths = (int(hidden),) if np.ndim(hidden) == 0 else tuple(int(h) for h in hidden)
    d = int(latent_dim)
    model = ekvae(
        obs_dims, max(1, d // 2) if aux_dim is None else int(aux_dim), d,
        action_dim=int(action_dim), num_bases=num_bases, transition_hidden=widths,
        decoder_hidden=widths, likelihood=likelihood, reward=reward, reward_hidden=widths,
        seed=seed, **model_kwargs,
    )  # fmt: skip
    guide = ekvae_guide(model, hidden=widths, seed=seed + 1)
    return ModelParts(model, guide, elbo or EKVAEBound(), {"encoder": guide.encoder})


def ekvae_world_model(obs_dims, action_dim: int, **kwargs) -> WorldModel:
    """An EKVAE with a reward head as a world model; arguments as :func:`ekvae_parts`."""
    return from_parts(ekvae_parts(obs_dims, action_dim, **kwargs))
