"""The two drivers behind the associative kernels: ``lax.scan`` or ``lax.associative_scan``.

They run the parallel filter, the RTS smoother's composition and the samplers; the sequential
*filter* is the textbook recursion of :mod:`inference.kalman.step` instead (its step emits the
predicted beliefs and log-likelihoods, which a prefix of associative elements does not).

A kernel supplies per-step *elements* and an associative operator ``op(acc, elem)`` where
``acc`` summarises the steps already absorbed (those before ``elem`` for a forward scan, those
after it for a reverse scan). The sequential driver folds ``op`` step by step; the parallel
driver hands the same ``op`` to ``jax.lax.associative_scan`` (Särkkä & García-Fernández 2021,
"Temporal parallelization of Bayesian smoothers"). Only the driver differs, never the math.

Every prefix (suffix) the kernels accumulate starts from an element with a zero gain (the
prior's filtering element, the last step's smoothing element, a sample's first draw), and stays
so under ``op``. The caller names the fields it reads (``read``) and how to rebuild an element
with a zero gain from them (``rebuild``); the sequential driver then carries and stores only
those fields, and XLA drops the arithmetic of the others. Results are ``read`` of the combined
elements under both drivers.
"""

from collections.abc import Callable
from functools import partial
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
    read: Callable[[Any], Any] = lambda e: e,
    rebuild: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """``read`` of all prefix (or, with ``reverse``, suffix) combinations of ``elems``.

    Args:
        op: associative operator ``op(acc, elem)``.
        elems: pytree of elements with a leading time axis.
        parallel: ``lax.associative_scan`` instead of ``lax.scan``.
        reverse: combine suffixes (from the last element backwards).
        unroll: unrolling of the sequential loop.
        read: the fields of a combined element the caller needs.
        rebuild: ``rebuild(fields, like)``: the element with those fields and a zero gain,
            shaped like the element ``like`` (needed for ``read`` to shrink the sequential carry).
    """
    if parallel:
        # associative_scan calls fn(earlier, later) forward and fn(later, earlier) in reverse,
        # which is ``op(acc, elem)`` in both directions.
        return read(lax.associative_scan(op, elems, reverse=reverse))
    first = jax.tree.map(lambda x: x[-1] if reverse else x[0], elems)
    rest = jax.tree.map(lambda x: x[:-1] if reverse else x[1:], elems)
    expand = (lambda f: f) if rebuild is None else partial(rebuild, like=first)

    def step(acc, elem):
        new = read(op(expand(acc), elem))
        return new, new

    _, out = lax.scan(step, read(first), rest, reverse=reverse, unroll=unroll)
    join = (
        (lambda o, f: jnp.concatenate([o, f[None]]))
        if reverse
        else (lambda o, f: jnp.concatenate([f[None], o]))
    )
    return jax.tree.map(join, out, read(first))


def per_step(arrays: tuple, varying: tuple[bool, ...]) -> tuple[tuple, Callable[[tuple], tuple]]:
    """``(xs, at)`` for a ``lax.scan`` over a mix of static and time-varying arrays.

    ``xs`` holds only the time-varying ones (``None`` in place of the others), so static
    parameters are neither broadcast nor sliced per step; ``at(xs_t)`` puts the static ones
    back beside the step's slices.
    """
    xs = tuple(a if v else None for a, v in zip(arrays, varying, strict=True))

    def at(xs_t: tuple) -> tuple:
        return tuple(x if v else a for a, x, v in zip(arrays, xs_t, varying, strict=True))

    return xs, at
