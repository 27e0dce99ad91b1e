"""The VRKN (Becker & Neumann 2022) as a :class:`rl.world_model.WorldModel`.

Nothing of the model is re-implemented here: the belief (filtered ``N(mean, diag(var))`` plus
one sample of the state), its update and its prior step are :func:`pssm.vrkn.vrkn`'s belief
step, the one its recurrent filter scans (see ``belief_step`` there), turned into a world model
by :func:`rl.world_model.belief_world_model`. ``imagine`` is one step of the model's own
generative process, reparameterised, with fresh MC-dropout masks from its key: the spread of
imagined trajectories over keys is the model's epistemic uncertainty (Sec. 3.3).

Training: ``-ELBO`` of the model with the Kalman-smoothing guide and free nats
(:class:`inference.objectives.FreeNatsELBO`, 3 per (batch, time) element by default).
"""

from inference.guides import kalman_smoothing
from inference.objectives import FreeNatsELBO
from pssm.vrkn import VRKNBelief, vrkn

from ..world_model import ModelParts, WorldModel, from_parts

__all__ = ["VRKNBelief", "vrkn_parts", "vrkn_world_model"]


def vrkn_parts(
    obs_dims,
    action_dim: int,
    *,
    latent_dim: int = 230,
    hidden: int = 300,
    mlp_hidden=(300, 300),
    mc_dropout: bool = True,
    dropout_rate: float = 0.1,
    free_nats: float = 3.0,
    features: str = "mean",
    elbo=None,
    reward: bool = True,
    seed: int = 0,
    **model_kwargs,
) -> ModelParts:
    """A VRKN with its Kalman-smoothing guide and ELBO (:func:`vrkn_world_model` makes the world
    model).

    Args:
        obs_dims: one modality's shape or ``{modality: shape}`` (ints for vectors,
            ``(H, W, C)`` for images; see :func:`pssm.vrkn.vrkn`).
        action_dim: ``u``.
        latent_dim, hidden, mlp_hidden: sizes (VRKN: 230, 300).
        mc_dropout, dropout_rate: Monte-Carlo dropout in the transition (VRKN: on, 0.1).
        free_nats: per (batch, time) element (VRKN: 3); ignored when ``elbo`` is given.
        features: ``"mean"`` (the belief mean) or ``"sample"`` (its sample, as the official
            code feeds actor, critic and reward head).
        elbo: the ELBO to train with (default ``FreeNatsELBO(free_nats)``).
        reward: with a reward head (needed to act; system identification trains without).
        seed: network initialisation.
        **model_kwargs: further arguments of :func:`pssm.vrkn.vrkn`.
    """
    if features not in ("mean", "sample"):
        raise ValueError(f"features must be 'mean' or 'sample', got {features!r}")
    model = vrkn(
        obs_dims, action_dim, latent_dim, hidden, mlp_hidden=mlp_hidden, mc_dropout=mc_dropout,
        dropout_rate=dropout_rate, reward=reward, seed=seed, **model_kwargs,
    )  # fmt: skip
    elbo = elbo or FreeNatsELBO(free_nats)
    return ModelParts(model, kalman_smoothing(model), elbo, {"features": features})


def vrkn_world_model(obs_dims, action_dim: int, **kwargs) -> WorldModel:
    """A VRKN with a reward head as a world model; arguments as :func:`vrkn_parts`."""
    return from_parts(vrkn_parts(obs_dims, action_dim, **kwargs))
