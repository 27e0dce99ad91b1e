"""KalMamba (:mod:`pssm.kalmamba`; Becker, Freymuth & Neumann 2024) as a
:class:`rl.world_model.WorldModel`.

Nothing of the model is re-implemented here: the belief (:class:`pssm.kalmamba.KalMambaBelief`:
the Gaussian over ``z_t`` and the Mamba backbone's recurrence), its update, its prior step and
the time-parallel whole-sequence filter are :func:`pssm.kalmamba.kalmamba`'s belief step, built
from the program's own encoders, backbone and dynamics and the Kalman steps of
:mod:`inference.kalman`, turned into a world model by :func:`rl.world_model.belief_world_model`.
``filter_sequence`` is that step's ``filter`` (Mamba and Kalman filter by associative scans);
alternating ``observe`` / ``imagine`` gives the same beliefs. ``features`` is the belief mean
(the paper's SAC input); ``imagine`` is the Kalman prediction, no sampling.

Objective: ``-ELBO + alpha R`` (:class:`inference.objectives.KalMambaELBO`) with the Kalman
smoothing guide (``parallel`` as the model), rewards scored against ``reward(z_{t+1})``. MC
dropout is on in training (the model's latent dropout site: one set of masks per loss
evaluation, drawn by the guide and replayed by the model) and off for acting unless
``act_dropout`` (then ``observe`` / ``imagine`` / ``filter_sequence`` draw masks from their keys:
Monte-Carlo samples of the dynamics).
"""

from inference.guides import kalman_smoothing
from inference.objectives import KalMambaELBO
from pssm.kalmamba import KalMambaBelief, kalmamba

from ..world_model import ModelParts, WorldModel, from_parts

__all__ = ["KalMambaBelief", "kalmamba_parts", "kalmamba_world_model"]


def kalmamba_parts(
    obs_dims,
    action_dim: int,
    *,
    alpha: float = 1.0,
    elbo=None,
    mc_dropout: bool = True,
    act_dropout: bool = False,
    detach_filter: bool = True,
    reward: bool = True,
    **model_kwargs,
) -> ModelParts:
    """KalMamba with its Kalman-smoothing guide and ELBO (:func:`kalmamba_world_model` makes
    the world model).

    Args:
        obs_dims: observation shape or ``{modality: shape}`` (vectors or ``(H, W, C)`` images).
        action_dim: ``u`` (at least 1).
        alpha: weight of the Mahalanobis regulariser (paper: 1).
        elbo: inner NumPyro ELBO (default ``TraceMeanField_ELBO()``: the analytic per-step KL of
            the VRKN bound), or a metrics wrapper such as free nats.
        mc_dropout: MC dropout in training (the program's dropout site,
            :func:`pssm.kalmamba.kalmamba`'s ``mc_dropout``).
        act_dropout: MC dropout in ``observe`` / ``imagine`` / ``filter_sequence``.
        detach_filter: stop the regulariser's gradient into the filtered belief.
        reward: with a reward head (needed to act; system identification trains without).
        **model_kwargs: sizes and options of :func:`pssm.kalmamba.kalmamba` (``latent_dim``,
            ``hidden``, ``d_model``, ``num_blocks``, ``d_state``, ``dropout``, ``seed``, ...).
    """
    model = kalmamba(
        obs_dims, action_dim=action_dim, reward=reward, mc_dropout=mc_dropout, **model_kwargs
    )
    inner = KalMambaELBO(elbo, alpha=alpha, detach_filter=detach_filter)
    guide = kalman_smoothing(model, parallel=model.parallel)
    return ModelParts(model, guide, inner, {"act_dropout": act_dropout})


def kalmamba_world_model(obs_dims, action_dim: int, **kwargs) -> WorldModel:
    """KalMamba with a reward head as a world model; arguments as :func:`kalmamba_parts`."""
    if int(action_dim) < 1:
        raise ValueError(f"a world model needs actions, got action_dim={action_dim}")
    return from_parts(kalmamba_parts(obs_dims, action_dim, **kwargs))
