"""The EKVAE's recognition model (Klushyn et al. 2021, "Latent Matters", Eq. 13) as a guide:

    q(a, z | x) = prod_t q_phi(a_t | x_t)  p(z_{0:T-1} | a_{0:T-1}),     [zeta ~ q(zeta | z_0)]

:func:`inference.guides.auxiliary` on the model's EKF-linearised structure (``model.structure``
of :func:`pssm.ekvae.ekvae`), plus the VHP's ``zeta`` when the model has one. The encoder it
builds is also what the model's belief step conditions on (``model.belief_step(encoder=
guide.encoder)``): an agent's ``a_t`` is the encoder's mean.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx

from inference.objectives.vhp import sample_posterior
from pssm import nets
from pssm.core import FlatAuxiliary, require

from .auxiliary import GaussianEncoder, auxiliary

__all__ = ["ekvae_guide"]


def ekvae_guide(
    model,
    *,
    encoder: nnx.Module | None = None,
    hidden: Sequence[int] = (128,),
    seed: int = 1,
):
    """The EKVAE recognition model ``q(a | x) p(z | a)`` (Eq. 13) as a NumPyro guide:
    :func:`inference.guides.auxiliary` on the EKF-linearised structure, plus
    ``zeta ~ q(zeta | z_0)`` when the model has a VHP.

    Args:
        model: an :func:`pssm.ekvae.ekvae` model, or any following
            :class:`pssm.core.FlatAuxiliary`.
        encoder: NNX module ``x -> (loc, scale)`` of ``a`` (default
            :class:`inference.guides.auxiliary.GaussianEncoder` with ``hidden`` layers), site
            ``"encoder"``.

    Returns:
        ``guide(obs, actions=None, mask=None, rewards=None)`` (``obs`` and ``mask`` as the
        model takes them; ``rewards`` are the model's alone) with attributes ``encoder``,
        ``encoder_name`` and ``auxiliary_posterior``.
    """
    require(model, FlatAuxiliary, "ekvae_guide")
    if encoder is None:
        encoder = GaussianEncoder(model.obs_dim, model.auxiliary_dim, hidden, rngs=nnx.Rngs(seed))
    base = auxiliary(model, encoder=encoder, name="encoder")

    def auxiliary_posterior(obs, actions=None, mask=None, rewards=None) -> dist.Distribution:
        """``q(a | x)`` of the guide's site ``"a"`` (batch ``(B,)``, event ``(T, p_a)``), as
        :func:`inference.guides.auxiliary` builds it."""
        x, observed = model.flatten(obs, mask)
        loc, scale = nets.register("encoder", encoder)(jnp.where(observed[..., None], x, 0.0))
        return dist.Normal(loc, scale).to_event(1).mask(observed).to_event(1)

    def guide(obs, actions=None, mask=None, rewards=None):  # rewards: scored by the model only
        x, observed = model.flatten(obs, mask)
        z = base(x, actions, None if mask is None else observed)
        if model.vhp is not None:
            posterior_fn = nets.register("vhp_posterior", model.vhp.posterior)
            with numpyro.plate("batch", x.shape[0]):
                sample_posterior(posterior_fn, z[:, 0])
        return z

    guide.encoder, guide.encoder_name = encoder, "encoder"
    guide.auxiliary_posterior = auxiliary_posterior
    return guide
