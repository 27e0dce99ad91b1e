"""The amortised filtering guide under its former name: :func:`inference.guides.filtering` is
the one implementation (vectors and images alike); ``rssm_filtering`` is the same function,
kept for existing callers."""

from .filtering import GuideNetworks, filtering, guide_inputs, sample_states

rssm_filtering = filtering

__all__ = ["GuideNetworks", "guide_inputs", "rssm_filtering", "sample_states"]
