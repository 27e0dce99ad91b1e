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
from inference.training import elbo_objective
from pssm.rssm import RSSMBelief, rssm

from ..world_model import WorldModel, belief_world_model

__all__ = ["RSSMBelief", "rssm_model_and_guide", "rssm_world_model"]


def rssm_model_and_guide(
    obs_dims,
    action_dim,
    *,
    stoch,
    deter,
    hidden,
    posterior_hidden=None,
    min_var=0.01,
    obs_var=1.0,
    mc_dropout=0.0,
    smoothing=False,
    backward_size=None,
    conv_depth=32,
    image_bits=5,
    embed_features=None,
    seed=0,
):
    """The NumPyro RSSM with a reward head and its amortised guide, filtering (sites
    ``"filter_net..."``) or, with ``smoothing=True``, smoothing (``"smoother_net..."``): the
    pair that :func:`rssm_world_model` trains (the same arguments give the same sites)."""
    model = rssm(
        obs_dims, action_dim, stoch, deter, hidden, min_var=min_var, obs_var=obs_var,
        reward=True, mc_dropout=mc_dropout, conv_depth=conv_depth, image_bits=image_bits,
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
    return model, guide


def rssm_world_model(
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
    seed: int = 0,
) -> WorldModel:
    """Build an RSSM with a reward head and its guide, as a world model.

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
        smoothing: train with the smoothing guide (the smoothing RSSM) instead of filtering;
            agents then condition with its online approximation (``b_{t+1} = 0``).
        backward_size: size of the smoothing guide's backward GRU state (default ``deter``).
        conv_depth, image_bits, embed_features: image encoder/decoder width, colour depth and
            optional embedding head (see :func:`pssm.rssm.rssm`,
            :func:`inference.guides.filtering`).
        elbo: NumPyro ELBO (default ``TraceMeanField_ELBO()``: analytic per-step KL).
        seed: network initialisation.
    """
    model, guide = rssm_model_and_guide(
        obs_dims, action_dim, stoch=stoch, deter=deter, hidden=hidden,
        posterior_hidden=posterior_hidden, min_var=min_var, obs_var=obs_var,
        mc_dropout=mc_dropout, smoothing=smoothing, backward_size=backward_size,
        conv_depth=conv_depth, image_bits=image_bits, embed_features=embed_features, seed=seed,
    )  # fmt: skip
    objective = elbo_objective(model, guide, elbo or TraceMeanField_ELBO())
    return belief_world_model(model, objective, posterior=guide.belief_posterior)
