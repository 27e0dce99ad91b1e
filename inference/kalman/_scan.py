"""The two drivers behind every kernel: ``lax.scan`` (sequential) or ``lax.associative_scan``.

A kernel supplies per-step *elements* and an associative operator ``op(acc, elem)`` where
``acc`` summarises the steps already absorbed (those before ``elem`` for a forward scan, those
after it for a reverse scan). The sequential driver folds ``op`` step by step; the parallel
driver hands the same ``op`` to ``jax.lax.associative_scan`` (Särkkä & García-Fernández 2021,
"Temporal parallelization of Bayesian smoothers"). Only the driver differs, never the math.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def scan(
    op: Callable[[Any, Any], Any],
    elems: Any,
    *,
    parallel: bool,
    reverse: bool = False,
    unroll: int = 1,
) -> Any:
    """All prefix (or, with ``reverse``, suffix) combinations of ``elems`` under ``op``."""
    if parallel:
        # associative_scan calls fn(earlier, later) forward and fn(later, earlier) in reverse,
        # which is ``op(acc, elem)`` in both directions.
        return lax.associative_scan(op, elems, reverse=reverse)
    first = jax.tree.map(lambda x: x[-1] if reverse else x[0], elems)
    rest = jax.tree.map(lambda x: x[:-1] if reverse else x[1:], elems)

    def step(acc, elem):
        new = op(acc, elem)
        return new, new

    _, out = lax.scan(step, first, rest, reverse=reverse, unroll=unroll)
    join = (
        (lambda o, f: jnp.concatenate([o, f[None]]))
        if reverse
        else (lambda o, f: jnp.concatenate([f[None], o]))
    )
    return jax.tree.map(join, out, first)
