"""Filtering guide family (RSSM / PlaNet / Dreamer):

    q(z_{0:T-1} | o) = q(z_0 | o_0) prod_t q(z_t | z_{t-1}, a_{t-1}, o_t)

Each factor sees the past (through the sampled previous state) and the current observation
only, never the future: the RSSM bound of the VRKN paper (Eq. 3). The closed-form member uses
the exact one-step posterior ``p(z_t | z_{t-1}, o_t)`` of a model's latent LGSSM (the VRKN
paper's "CF" variant of Figure 2); it reads the model only through ``model.structure``.
"""

import jax

from inference import kalman
from pssm.core import sample_latent_path


def closed_form_filtering(model):
    """Guide: ``prod_t p(z_t | z_{t-1}, o_t)`` from the model's latent LGSSM (exact factors)."""
    if not hasattr(model, "structure"):
        raise TypeError("closed_form_filtering needs a model declared with pssm.linear_gaussian")

    def guide(obs, *args, **kwargs):
        s = model.structure(obs, *args, **kwargs)
        first, conditionals = jax.vmap(kalman.one_step_conditionals)(*s)
        return sample_latent_path(first, conditionals)

    return guide
