"""One step's observations as a belief step consumes them (shared by every family that acts)."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def step_observations(obs, mask, names: list[str]) -> tuple[dict, jax.Array]:
    """One step's observations as ``{modality: (B, ...)}`` with the unseen entries zeroed
    (they may hold anything, NaN included, which an encoder would carry into the belief even
    where its output is masked), and the sensor mask as ``(B, K)`` booleans, ``K = len(names)``.

    ``obs``: an array (one modality, named ``names[0]``) or a mapping holding every name;
    ``mask``: ``None`` (all seen), ``(B,)`` (per step) or ``(B, K)`` (per sensor).
    """
    parts = {k: obs[k] for k in names} if isinstance(obs, Mapping) else {names[0]: obs}
    B, K = jnp.shape(parts[names[0]])[0], len(names)
    m = jnp.ones((B, K), bool) if mask is None else jnp.asarray(mask).astype(bool)
    m = jnp.broadcast_to(m[:, None], (B, K)) if m.ndim == 1 else m
    seen = lambda i, o: m[:, i].reshape((B,) + (1,) * (jnp.ndim(o) - 1))
    return {k: jnp.where(seen(i, parts[k]), parts[k], 0.0) for i, k in enumerate(names)}, m
