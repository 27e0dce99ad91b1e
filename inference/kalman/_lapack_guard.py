"""No batched LAPACK call may wait on XLA:CPU's thread pool (the jaxlib 0.10 deadlock).

The failure (``benchmarks/README.md``, "CPU pitfalls"): jaxlib 0.10's CPU LAPACK kernels
(``potrf``, ``trsm``, ``getrf``, ``syevd``, ...) split a batched call whose estimated work,
``batch * cost_per_matrix``, reaches 200 000 flop into chunks, schedule the chunks on XLA:CPU's
intra-op thread pool and block that thread until they finish. When the thunk executor runs
as many such calls at once as the pool has threads, every thread waits for chunks no thread
is left to run: the process hangs at 0 % CPU, for ever. A dense smoother under ``vmap`` inside
a jitted ELBO hit this on the first call on a 2-core machine (``tests/test_no_hang.py``).

A call below the threshold runs inline on the calling thread and never waits, so this module
re-registers the CPU lowering of every LAPACK-backed ``jax.lax.linalg`` primitive: a call
whose batch would be split is emitted as several calls on slices of the batch, each under the
threshold (unrolled for a few slices, a ``lax.map`` over slices otherwise), and the original
lowering emits each slice. Every matrix still goes through the same LAPACK routine, so results
are bit-identical; what is lost is LAPACK's own fan-out of one large batch over the cores
(independent slices may still run concurrently under the thunk executor).

It is applied once, when :mod:`inference.kalman` is imported (``pssm``, ``inference`` and ``rl``
all import it), only for jaxlib < 0.11 (0.11 builds no longer fan out LAPACK batches), and can
be turned off with ``PSSM_LAPACK_GUARD=0``. Being a lowering rule it applies to every program
compiled afterwards in the process, the user's own ``jnp.linalg`` calls and peer libraries
included; programs compiled before the import keep the original lowering.
"""

import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.interpreters import mlir
from jax._src.lax import linalg as _linalg

# jaxlib's threshold is 200 000 flop of estimated work per call; half of it leaves a margin
# for cost estimates that differ between jaxlib builds.
_WORK_LIMIT = 100_000
_UNROLL_SLICES = 4  # up to this many slices are emitted as separate calls, more as a lax.map


def _core(aval, rank):
    return aval.shape[aval.ndim - rank :]


def _cost_cholesky(avals, params):
    (n, _) = _core(avals[0], 2)
    return n**3 // 3


def _cost_triangular_solve(avals, params):
    rows, cols = _core(avals[1], 2)
    return rows * cols * (rows if params["left_side"] else cols)


def _cost_lu(avals, params):
    rows, cols = _core(avals[0], 2)
    return rows * cols * min(rows, cols)


def _cost_qr(avals, params):
    rows, cols = _core(avals[0], 2)
    return 2 * rows * cols * min(rows, cols)


def _one_matrix_per_call(avals, params):
    return _WORK_LIMIT  # cost unknown: one matrix per call is always inline


# primitive name -> (core rank of each operand, cost per matrix)
_RULES = {
    "cholesky": ((2,), _cost_cholesky),
    "triangular_solve": ((2, 2), _cost_triangular_solve),
    "lu": ((2,), _cost_lu),
    "geqrf": ((2,), _cost_qr),
    "geqp3": ((2, 1), _cost_qr),
    "householder_product": ((2, 1), _cost_qr),
    "eigh": ((2,), _one_matrix_per_call),
    "eig": ((2,), _one_matrix_per_call),
    "svd": ((2,), _one_matrix_per_call),
    "schur": ((2,), _one_matrix_per_call),
    "hessenberg": ((2,), _one_matrix_per_call),
    "tridiagonal": ((2,), _one_matrix_per_call),
    "tridiagonal_solve": ((1, 1, 1, 2), _one_matrix_per_call),
}


def slice_size(avals, name: str, params: dict) -> tuple[int, int]:
    """``(batch, slice)``: the batch size of a call and the largest inline slice of it."""
    ranks, cost = _RULES[name]
    batch = math.prod(avals[0].shape[: avals[0].ndim - ranks[0]])
    per_matrix = cost(avals, params)
    if jnp.issubdtype(avals[0].dtype, jnp.complexfloating):
        per_matrix *= 3
    return batch, max(1, (_WORK_LIMIT - 1) // max(per_matrix, 1))


def _sliced(prim, ranks, batch, size, params):
    """A function applying ``prim`` to slices of at most ``size`` matrices of the batch."""

    def call(*xs):
        out = prim.bind(*xs, **params)
        return tuple(out) if prim.multiple_results else (out,)

    def run(*args):
        batch_shape = args[0].shape[: args[0].ndim - ranks[0]]
        pairs = zip(args, ranks, strict=True)
        flat = [x.reshape((batch, *x.shape[x.ndim - r :])) for x, r in pairs]
        full, rest = divmod(batch, size)
        if full + (rest > 0) <= _UNROLL_SLICES:
            starts = range(0, batch, size)
            parts = [call(*(x[s : s + size] for x in flat)) for s in starts]
            outs = [jnp.concatenate(p) for p in zip(*parts, strict=True)]
        else:
            head = [x[: full * size].reshape((full, size, *x.shape[1:])) for x in flat]
            mapped = lax.map(lambda h: call(*h), head)
            outs = [o.reshape((full * size, *o.shape[2:])) for o in mapped]
            if rest:
                tail = call(*(x[full * size :] for x in flat))
                outs = [jnp.concatenate([o, t]) for o, t in zip(outs, tail, strict=True)]
        outs = [o.reshape((*batch_shape, *o.shape[1:])) for o in outs]
        return outs if prim.multiple_results else outs[0]

    return run


def _guard(prim, original):
    ranks, _ = _RULES[prim.name]

    def rule(ctx, *args, **params):
        batch, size = slice_size(ctx.avals_in, prim.name, params)
        if batch <= size or len(args) != len(ranks):
            return original(ctx, *args, **params)
        run = _sliced(prim, ranks, batch, size, params)
        return mlir.lower_fun(run, multiple_results=prim.multiple_results)(ctx, *args)

    rule.pssm_lapack_guard = True
    return rule


def _needed() -> bool:
    if os.environ.get("PSSM_LAPACK_GUARD", "1") == "0":
        return False
    major, minor = (int(v) for v in jax.lib.__version__.split(".")[:2])
    return (major, minor) < (0, 11)


def install() -> list[str]:
    """Re-register the CPU lowerings (idempotent); returns the names of guarded primitives."""
    if not _needed():
        return []
    cpu = mlir._platform_specific_lowerings["cpu"]
    guarded = []
    for name in _RULES:
        prim = getattr(_linalg, f"{name}_p", None)
        entry = cpu.get(prim) if prim is not None else None
        if entry is None:
            continue
        if not getattr(entry.rule, "pssm_lapack_guard", False):
            mlir.register_lowering(prim, _guard(prim, entry.rule), platform="cpu")
        guarded.append(name)
    return guarded


GUARDED = install()

__all__ = ["GUARDED", "install", "slice_size"]
