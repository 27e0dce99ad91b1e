"""Agents on a world model's belief, all behind one protocol, :class:`Agent`.

The runner's generic driver (:mod:`rl.drivers`) filters observations online
(:func:`rl.world_model.act`) and hands every agent the same things: the model's constrained
parameters, the agent's learned state, its per-episode memory and the filtered belief. Training
calls hand it the filtered beliefs of replayed windows. SAC on the belief
(:func:`rl.agents.sac.belief_agent`), Dreamer (:func:`rl.agents.dreamer.dreamer`) and PlaNet
(:func:`rl.agents.planet.planet`) are such agents; a new one is one module returning an
:class:`Agent` plus a line in :data:`rl.drivers.AGENTS`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

PyTree = Any


class Agent(NamedTuple):
    """What the generic driver needs of a model-based agent (one signature for every agent).

    Attributes:
        init: ``key -> state``: the learned state (a pytree; ``()`` for a planner).
        memory: ``(params, batch_size) -> memory``: per-episode acting memory at an episode's
            start (PlaNet: the action-sequence Gaussian it warm-starts; ``()`` for most).
        act: ``(params, state, memory, belief, key, explore) -> (action (B, u), memory)`` on the
            filtered belief ``(B, ...)``; ``explore`` (a traced bool) adds exploration.
        update: ``(params, state, key, beliefs, batch, updates) -> (state, metrics)`` or
            ``None`` (nothing to learn). ``beliefs``: filtered beliefs of replayed windows
            ``(N, T, ...)`` (no gradient into the model); ``batch``: their ``"actions"``
            ``(N, T, u)``, ``"rewards"`` and ``"discounts"`` ``(N, T)``; ``updates`` (static):
            how many gradient steps to take.
        sequences: ``updates -> N``: replayed windows one training call needs.
    """

    init: Callable[..., PyTree]
    memory: Callable[..., PyTree]
    act: Callable[..., tuple[Any, PyTree]]
    update: Callable[..., tuple[PyTree, dict]] | None
    sequences: Callable[[int], int]


def no_memory(params, batch_size: int):
    """:attr:`Agent.memory` of an agent that keeps nothing between steps."""
    return ()
