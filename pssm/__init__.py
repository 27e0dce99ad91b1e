"""pssm: generative state space models as NumPyro programs."""

from pssm.distributions import LinearGaussianStateSpace

__all__ = ["LinearGaussianStateSpace"]
