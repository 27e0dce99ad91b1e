"""Guide families: constructors taking a model (plus an inference network where the family has
one) and returning an ordinary NumPyro guide with the model's signature."""

from .auxiliary import auxiliary
from .ekvae import ekvae_guide
from .filtering import closed_form_filtering, filtering
from .kalman import backward_sampling, kalman_smoothing
from .smoothing_rssm import smoothing_rssm

__all__ = [
    "auxiliary",
    "backward_sampling",
    "closed_form_filtering",
    "ekvae_guide",
    "filtering",
    "kalman_smoothing",
    "smoothing_rssm",
]
