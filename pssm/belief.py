"""The belief step: what a model offers to act (declared here, implemented once per family).

A model that can act carries ``model.belief_step()``, which registers the model's networks
(under the caller's ``numpyro.handlers.substitute(data=params)``, with the model's own site
names) and returns a :class:`BeliefStep` of pure functions over a *belief*, any pytree with a
leading batch axis ``(B, ...)``. Time convention of :mod:`pssm.core` (``a_t`` drives
``z_t -> z_{t+1}``)::

    b = step.init(B)                          p(z_0), before any observation
    b = step.condition(b, o_0, m_0, key)      p(z_0 | o_0)                  (filtering update)
    b = step.predict(b, a_0, key)             p(z_1 | o_0, a_0)             (prior step)
    b = step.condition(b, o_1, m_1, key)      ...

The model's NumPyro program builds its filtered beliefs from the very same functions (VRKN's
recurrent filter: ``predict`` is the transition linearised at the filtered mean followed by
:func:`inference.kalman.predict`, ``condition`` is :func:`inference.kalman.update` on the
encoders' latent observations), so the online filter of an agent and the filter that was
trained are one implementation. ``predict`` without ``condition`` rolls the model forward
(planning, imagined trajectories): it may sample and must be differentiable in the
parameters and in the belief.

``obs_t`` is ``(B, ...)`` or a dict of modalities; ``mask_t`` is ``None`` (all seen), ``(B,)``
or ``(B, K)``; a fully masked step leaves the belief's distribution as it is.

A model whose program filters a whole sequence faster than step by step (KalMamba's
time-parallel filter) also fills ``filter``; it must return what alternating ``condition`` and
``predict`` returns (a test of each such family checks it), and is what training-time consumers
(agents' updates on replayed windows, reports) use.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from jax import Array

Belief = Any


class BeliefStep(NamedTuple):
    """A model's online filter and the heads agents use (see the module docstring).

    Attributes:
        init: ``batch_size -> belief``: the prior of ``z_0``.
        condition: ``(belief, obs_t, mask_t, key) -> belief``: condition on one step.
        predict: ``(belief, action_t (B, u), key) -> belief``: one prior step, no observation.
        features: ``belief -> (B, F)``: what actor, critic and heads see.
        reward: ``features (..., F) -> (...)``: the reward of *arriving* in a state, or ``None``
            for a model built without a reward head.
        decode: optional ``features (..., F) -> observation means`` (array or dict like
            ``obs``), for reconstructions and open-loop predictions.
        filter: optional ``(obs (B, T, ...), actions (B, T, u), mask, key) -> beliefs`` with a
            leading ``(B, T)`` on every leaf: the beliefs after observing each ``o_t``, all at
            once (``None``: callers scan ``condition`` / ``predict``).
    """

    init: Callable[[int], Belief]
    condition: Callable[[Belief, Any, Any, Array], Belief]
    predict: Callable[[Belief, Array, Array], Belief]
    features: Callable[[Belief], Array]
    reward: Callable[[Array], Array] | None = None
    decode: Callable[[Array], Any] | None = None
    filter: Callable[[Any, Array, Any, Array], Belief] | None = None
