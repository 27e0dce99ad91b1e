"""The RSSM family (PlaNet / Dreamer) as a :class:`rl.world_model.WorldModel`, on vectors and
images: the plain RSSM, the MC-dropout RSSM and the smoothing RSSM (Becker & Neumann 2022,
Sec. 2.3 and Fig. 4).

Nothing of the model is re-implemented here: the belief ``(h_t, z_t, first)``, its update and
its prior step are :func:`pssm.rssm.rssm`'s belief step (the prior step its program scans),
conditioning with the guide's own per-step posterior (``guide.belief_posterior`` of
:func:`inference.guides.filtering`, or of :func:`inference.guides.smoothing_rssm` with its
online approximation ``b_{t+1} = 0``), turned into a world model by
:func:`rl.world_model.belief_world_model`. With MC dropout ``imagine`` draws its masks from its
key: each key (e.g. each PlaNet candidate's) samples other dynamics. The model trains on
``-ELBO`` with the per-step analytic KL of ``TraceMeanField_ELBO`` (the RSSM objective) unless
another ELBO is given.
"""

from collections.abc import Mapping

from numpyro.infer import TraceMeanField_ELBO

from inference.guides import filtering, smoothing_rssm
from pssm.rssm import RSSMBelief, rssm

from ..world_model import ModelParts, WorldModel, from_parts

__all__ = ["RSSMBelief", "rssm_parts", "rssm_world_model"]


def rssm_parts(
    obs_dims: int | tuple[int, ...] | Mapping[str, int | tuple[int, ...]],
    action_dim: int,
    *,
    stoch: int = 30,
    deter: int = 200,
    hidden: int = 200,
    posterior_hidden: int | None = None,
    min_var: float = 0.01,
    obs_var: float = 1.0,
    mc_dropout: float = 0.0,
    smoothing: bool = False,
    backward_size: int | None = None,
    conv_depth: int = 32,
    image_bits: int = 5,
    embed_features: int | None = None,
    elbo=None,
    reward: bool = True,
    seed: int = 0,
) -> ModelParts:
    """An RSSM with its guide and ELBO (:func:`rssm_world_model` makes the world model).

    Args:
        obs_dims: one modality's shape (``p``, or ``(H, W, C)`` for ``uint8`` or preprocessed
            float images), or ``{modality: shape}`` (e.g. ``{"image": (64, 64, 3), "proprio": 5}``).
        action_dim: ``u``.
        stoch, deter, hidden: RSSM sizes (PlaNet/Dreamer: 30, 200, 200).
        posterior_hidden: hidden width of the posterior network (default ``hidden``).
        min_var: floor of prior and posterior variances.
        obs_var: fixed decoder variance (per pixel in the preprocessed scale for images).
        mc_dropout: MC-dropout rate of the deterministic path and prior (``0``: none; ``> 0``:
            the MCD-RSSM).
        smoothing: train with the smoothing guide (sites ``"smoother_net..."``) instead of
            filtering (``"filter_net..."``): the smoothing RSSM; agents then condition with its
            online approximation (``b_{t+1} = 0``).
        backward_size: size of the smoothing guide's backward GRU state (default ``deter``).
        conv_depth, image_bits, embed_features: image encoder/decoder width, colour depth and
            optional embedding head (see :func:`pssm.rssm.rssm`,
            :func:`inference.guides.filtering`).
        elbo: NumPyro ELBO (default ``TraceMeanField_ELBO()``: analytic per-step KL).
        reward: with a reward head (needed to act; system identification trains without).
        seed: network initialisation (the guide's: ``seed + 1``).
    """
    model = rssm(
        obs_dims, action_dim, stoch, deter, hidden, min_var=min_var, obs_var=obs_var,
        reward=reward, mc_dropout=mc_dropout, conv_depth=conv_depth, image_bits=image_bits,
        seed=seed,
    )  # fmt: skip
    common = dict(
        hidden=posterior_hidden or hidden, latent_dim=stoch, min_var=min_var,
        conv_depth=conv_depth, embed_features=embed_features, seed=seed + 1,
    )  # fmt: skip
    if smoothing:
        guide = smoothing_rssm(model, backward_size=backward_size or deter, **common)
    else:
        guide = filtering(model, **common)
    elbo = elbo or TraceMeanField_ELBO()
    return ModelParts(model, guide, elbo, {"posterior": guide.belief_posterior})


def rssm_world_model(obs_dims, action_dim: int, **kwargs) -> WorldModel:
    """An RSSM with a reward head as a world model; arguments as :func:`rssm_parts`."""
    return from_parts(rssm_parts(obs_dims, action_dim, **kwargs))
