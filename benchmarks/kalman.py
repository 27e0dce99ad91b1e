"""Kalman smoother speed: pssm's diagonal and dense smoothers against dynamax and cuthbert.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.kalman --quick          # a few minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.kalman                  # d in {4, 32, 230}, T in {32, 256, 2048}
    .venv/bin/python -m benchmarks.kalman --d 32 --T 256 --peers dynamax --repeats 10

Every implementation smooths the same latent LGSSM (time-axis convention of
:mod:`inference.kalman._types`; the first state is observed)::

    z_0 ~ N(m_0, P_0),   z_{t+1} = A z_t + b + N(0, Q),   w_t = z_t + N(0, R),   t = 0..T-1

for a batch of sequences (``jax.vmap``), jitted, float32, static parameters passed as arguments.
Two model structures: *diag* (every matrix diagonal: the deep models' case; pssm uses its
elementwise algebra, the peers get the same model written as dense matrices because they only
support full ones) and *dense* (full ``A, Q, R, P_0``). Implementations:

- ``ours-seq`` / ``ours-par``: ``inference.kalman.smoother(parallel=False / True)``.
- ``dynamax-seq`` / ``dynamax-par``: ``dynamax.linear_gaussian_ssm.lgssm_smoother`` and
  ``dynamax.linear_gaussian_ssm.parallel_inference.lgssm_smoother``. Same convention as ours for
  static parameters (``initial`` is the prior of the first, observed, state).
- ``cuthbert-seq`` / ``cuthbert-par``: ``cuthbert.filter`` + ``cuthbert.smoother`` with
  ``cuthbert.gaussian.kalman`` (square-root form). cuthbert's initial state carries no
  observation, so it is given a dummy state ``x_{-1}`` and a first transition ``F = 0, c = m_0,
  Q = P_0`` into our ``z_0``; its first output is dropped.

On the diag model two references are timed beside them: ``hand-seq``, a minimal hand-written
elementwise Kalman filter and RTS smoother (two ``lax.scan`` s) returning the same outputs as
``ours-seq`` (predicted, filtered and smoothed moments, per-step and total log-likelihood,
cross-covariances, backward conditionals), and ``floor-seq``, the memory-traffic floor: one
elementwise pass that reads the inputs and writes outputs of the same shapes and total size.
The tables print ``ours / hand-written`` and ``ours / floor`` beside the peer ratios.

Each timed call returns the library's whole smoother output (for pssm that includes the lag-one
cross-covariances and backward conditionals), or with ``--outputs peer`` what dynamax returns
(filtered and smoothed moments, cross-covariances, log-likelihood) from pssm and the references
alike: inside ``jax.jit`` the unused outputs are dead code, so this times a user who needs what
dynamax gives. With ``--interleave`` all implementations of one ``(structure, d, T)`` are
compiled and warmed up in one worker and timed in rounds that call each once in turn, so that
a shared machine's varying load falls alike on all of them. Before timing, a float64 instance
of every ``(d, structure)`` checks that all implementations agree on smoothed means,
covariances and the log-likelihood. Compile time is reported apart from the median run time
after one warm-up call.

Configurations run in a separate worker process under a hard time limit. A configuration is
skipped, with the reason printed, when a smaller one of the same implementation was skipped,
when its run time or memory extrapolated linearly in ``T`` from the largest measured ``T`` at
the same ``d`` exceeds ``--budget`` / ``--max-mem-gb``, when XLA's memory estimate after
compiling exceeds ``--max-mem-gb``, when it overruns its time limit (``--compile-budget`` for
compiling, ``--budget`` + 10 s for the warm-up call and for the timed calls), or when its worker
deadlocks three times. The worker runs with :data:`MALLOC_ENV` (glibc's malloc would otherwise
return every freed buffer of more than 32 MiB to the kernel, and each call would page-fault its
fresh ~30 MB output buffers back in: 7k-50k minor faults per call, one fused op 35 -> 85 ms), so
that the timings measure compute, not the allocator. Unless ``--no-cpu-workaround``, it also runs
with
``OPENBLAS_NUM_THREADS=1``, ``NPROC=8`` (a larger XLA:CPU thread pool) and
:data:`CPU_WORKAROUND_FLAG` in ``XLA_FLAGS``: without them jaxlib 0.10's batched LAPACK
kernels stall or deadlock XLA:CPU's thread pool on 2 cores (``benchmarks/README.md``).
Results go to ``benchmarks/results/kalman.json``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMPLS = ("ours-seq", "ours-par", "dynamax-seq", "dynamax-par", "cuthbert-seq", "cuthbert-par")
# references on the diag model only: a minimal hand-written filter + RTS smoother, and the
# memory-traffic floor of the smoother's inputs and outputs
REFERENCES = ("hand-seq", "floor-seq")
STRUCTURES = ("diag", "dense")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kalman.json"
# the targets (benchmarks/README.md): (what, structure, d, T, numerator, denominator,
# bound); the ratio is time(numerator) / time(denominator), "min" means ratio >= bound
TARGETS = (
    ("diag: dynamax-seq / ours-seq >= 20", "diag", 32, 256, "dynamax-seq", "ours-seq", 20.0),
    ("diag: ours-seq / hand-seq <= 1.25", "diag", 230, 2048, "hand-seq", "ours-seq", 1 / 1.25),
    ("dense: dynamax-seq / ours-seq >= 1.2", "dense", 32, 256, "dynamax-seq", "ours-seq", 1.2),
    ("dense: dynamax-seq / ours-seq >= 1", "dense", 4, 256, "dynamax-seq", "ours-seq", 1.0),
    ("dense: dynamax-seq / ours-seq >= 1", "dense", 230, 256, "dynamax-seq", "ours-seq", 1.0),
    ("dense: dynamax-par / ours-par >= 1", "dense", 32, 256, "dynamax-par", "ours-par", 1.0),
)
CPU_WORKAROUND_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
CPU_WORKAROUND_POOL = 8  # NPROC: XLA:CPU's intra-op thread pool size
# glibc malloc: keep large freed blocks in the heap (no mmap / trim per call); read by glibc at
# process start, so they are set before the worker is spawned
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)}


# ------------------------------------------------------------------------------------------
# Models


class Model(NamedTuple):
    """A batch of sequences from one static LGSSM (numpy float64).

    Diagonal structure stores ``P0, A, Q, R`` as vectors ``(d,)``, dense as ``(d, d)``;
    ``w`` is ``(batch, T, d)``.
    """

    m0: np.ndarray
    P0: np.ndarray
    A: np.ndarray
    b: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    w: np.ndarray


def _spd(rng, d, lo, hi):
    U = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (U * rng.uniform(lo, hi, d)) @ U.T


@lru_cache(maxsize=4)
def make_model(structure: str, d: int, T: int, batch: int, seed: int = 0) -> Model:
    """A stable random LGSSM and ``batch`` sequences simulated from it.

    Diagonal: ``A ~ U(0.5, 0.99)`` (the VRKN range of transition entries), ``Q ~ U(0.01, 0.1)``,
    ``R ~ U(0.1, 1)``, ``P_0 ~ U(0.5, 2)``. Dense: ``A = U diag(s) V^T`` with random orthogonal
    ``U, V`` and singular values ``s ~ U(0.5, 0.99)``; ``Q, R, P_0`` randomly rotated with
    eigenvalues in the same ranges.
    """
    rng = np.random.default_rng([seed, d, T, batch, STRUCTURES.index(structure)])
    m0, b = rng.normal(size=d), 0.1 * rng.normal(size=d)
    if structure == "diag":
        A, Q = rng.uniform(0.5, 0.99, d), rng.uniform(0.01, 0.1, d)
        R, P0 = rng.uniform(0.1, 1.0, d), rng.uniform(0.5, 2.0, d)
        cQ, cR, cP = np.sqrt(Q), np.sqrt(R), np.sqrt(P0)
        z = m0 + cP * rng.normal(size=(batch, d))
    else:
        U, V = (np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(2))
        A = (U * rng.uniform(0.5, 0.99, d)) @ V.T
        Q, R, P0 = _spd(rng, d, 0.01, 0.1), _spd(rng, d, 0.1, 1.0), _spd(rng, d, 0.5, 2.0)
        cQ, cR, cP = (np.linalg.cholesky(x).T for x in (Q, R, P0))  # row-vector form
        z = m0 + rng.normal(size=(batch, d)) @ cP
    w = np.empty((batch, T, d))
    for t in range(T):
        noise = rng.normal(size=(batch, d))
        w[:, t] = z + (cR * noise if structure == "diag" else noise @ cR)
        noise = rng.normal(size=(batch, d))
        z = (z * A if structure == "diag" else z @ A.T) + b
        z = z + (cQ * noise if structure == "diag" else noise @ cQ)
    return Model(m0, P0, A, b, Q, R, w)


def as_dense(model: Model) -> Model:
    """The same model with every diagonal parameter written as a full matrix."""
    if model.P0.ndim == 2:
        return model
    return model._replace(**{k: np.diag(getattr(model, k)) for k in ("P0", "A", "Q", "R")})


# ------------------------------------------------------------------------------------------
# The implementations: fn(m0, P0, A, b, Q, R, w) on a batch, and what to compare from its output


class PeerOutputs(NamedTuple):
    """What dynamax's smoother returns (``--outputs peer``): filtered and smoothed moments,
    lag-one cross-covariances and the marginal log-likelihood."""

    filtered_mean: object
    filtered_cov: object
    smoothed_mean: object
    smoothed_cov: object
    cross_cov: object
    log_likelihood: object


def _extract_peer(out: PeerOutputs):
    return out.smoothed_mean, out.smoothed_cov, out.log_likelihood


def _ours(parallel: bool, unroll: int = 1, outputs: str = "all"):
    import jax

    from inference import kalman

    def fn(m0, P0, A, b, Q, R, w):
        prior, dynamics = kalman.Gaussian(m0, P0), kalman.Dynamics(A, b, Q)

        def one(w):
            r = kalman.smoother(
                prior, dynamics, kalman.Emissions(w, R), parallel=parallel, unroll=unroll
            )
            if outputs == "all":
                return r
            # the rest is dead code for XLA: not computed where only outputs need it
            f = r.filtered.filtered
            return PeerOutputs(f.mean, f.cov, *r.smoothed, r.cross_cov, r.log_likelihood)

        return jax.vmap(one)(w)

    def extract(out):
        if outputs == "peer":
            return _extract_peer(out)
        return out.smoothed.mean, out.smoothed.cov, out.log_likelihood

    return fn, extract


def _dynamax(parallel: bool):
    import jax
    import jax.numpy as jnp
    from dynamax.linear_gaussian_ssm import lgssm_smoother
    from dynamax.linear_gaussian_ssm.inference import make_lgssm_params
    from dynamax.linear_gaussian_ssm.parallel_inference import lgssm_smoother as par_smoother

    smoother = par_smoother if parallel else lgssm_smoother

    def fn(m0, P0, A, b, Q, R, w):
        H = jnp.eye(m0.shape[0], dtype=w.dtype)
        params = make_lgssm_params(m0, P0, A, Q, H, R, dynamics_bias=b)
        return jax.vmap(lambda y: smoother(params, y))(w)

    def extract(out):
        return out.smoothed_means, out.smoothed_covariances, out.marginal_loglik

    return fn, extract


def _cuthbert(parallel: bool):
    import cuthbert
    import jax
    import jax.numpy as jnp
    from cuthbert.gaussian import kalman as ck

    def fn(m0, P0, A, b, Q, R, w):
        d, T = m0.shape[0], w.shape[1]
        eye = jnp.eye(d, dtype=w.dtype)
        cQ, cR, cP = (jnp.linalg.cholesky(x) for x in (Q, R, P0))

        def dynamics(inputs):  # step 0 is the transition from the dummy x_{-1} into z_0
            first = inputs["first"]
            return (
                jnp.where(first, 0.0, A),
                jnp.where(first, m0, b),
                jnp.where(first, cP, cQ),
            )

        def observation(inputs):
            return eye, jnp.zeros(d, w.dtype), cR, inputs["y"]

        filt = ck.build_filter(jnp.zeros(d, w.dtype), eye, dynamics, observation)
        smooth = ck.build_smoother(dynamics)

        def one(y):
            inputs = {"y": y, "first": jnp.arange(T) == 0}
            states = cuthbert.filter(filt, inputs, filt.init_prepare(), parallel=parallel)
            return states, cuthbert.smoother(smooth, states, parallel=parallel)

        return jax.vmap(one)(w)

    def extract(out):
        states, smoothed = out
        L = np.asarray(smoothed.chol_cov)[:, 1:]
        cov = L @ np.swapaxes(L, -1, -2)
        return smoothed.mean[:, 1:], cov, states.log_normalizing_constant[:, -1]

    return fn, extract


def _hand_written(outputs: str = "all"):
    """A minimal elementwise Kalman filter and RTS smoother for the diag model: two
    ``lax.scan`` s, one fused predict/update and one fused RTS step per iteration, returning
    what ``ours-seq`` returns (``outputs="all"``: predicted, filtered, smoothed moments;
    per-step and total log-likelihood; cross-covariances; backward conditionals ``(E, g, L)``;
    ``"peer"``: :class:`PeerOutputs`)."""
    import jax
    import jax.numpy as jnp

    log_2pi = float(np.log(2 * np.pi))

    def fn(m0, P0, A, b, Q, R, w):
        def one(w):
            def forward(carry, w_t):
                m, P = carry  # predicted
                S = P + R
                K = P / S
                r = w_t - m
                mf, Pf = m + K * r, P - K * P
                ll = -0.5 * jnp.sum(r * r / S + jnp.log(S) + log_2pi)
                return (A * mf + b, A * A * Pf + Q), (m, P, mf, Pf, ll)

            _, (mp, Pp, mf, Pf, ll) = jax.lax.scan(forward, (m0, P0), w)

            def backward(carry, x):
                ms, Ps = carry  # smoothed, t + 1
                m, P, m_pred, P_pred = x
                E = P * A / P_pred
                g = m - E * m_pred
                L = P * Q / P_pred
                ms_t, Ps_t = E * ms + g, E * E * Ps + L
                return (ms_t, Ps_t), (ms_t, Ps_t, E * Ps, E, g, L)

            xs = (mf[:-1], Pf[:-1], mp[1:], Pp[1:])
            _, out = jax.lax.scan(backward, (mf[-1], Pf[-1]), xs, reverse=True)
            ms, Ps, cross, E, g, L = out
            ms, Ps = jnp.concatenate([ms, mf[-1:]]), jnp.concatenate([Ps, Pf[-1:]])
            if outputs == "peer":
                return PeerOutputs(mf, Pf, ms, Ps, cross, jnp.sum(ll))
            return (mp, Pp, mf, Pf, ll, jnp.sum(ll)), (ms, Ps), cross, (E, g, L)

        return jax.vmap(one)(w)

    def extract(out):
        if outputs == "peer":
            return _extract_peer(out)
        return out[1][0], out[1][1], out[0][5]

    return fn, extract


def _floor(outputs: str = "all"):
    """The memory-traffic floor of ``ours-seq`` on the diag model: every output of the same
    shape as pssm's (:func:`_hand_written`'s, for the same ``outputs``), each one elementwise
    expression of the inputs, in one jitted program (XLA fuses them into a few loop passes):
    reads the inputs once and writes the smoother's total output size, with no recursion."""
    import jax.numpy as jnp

    def fn(m0, P0, A, b, Q, R, w):
        now, nxt = w[:, :-1], w[:, 1:]
        ll = jnp.sum(w * w / R, axis=-1)
        if outputs == "peer":
            total = jnp.sum(ll, axis=-1)
            return PeerOutputs(w * A + b, w * Q, w * R + b, w * P0 * Q, now * A * nxt, total)
        return (
            (w + m0, w * P0, w * A + b, w * Q, ll, jnp.sum(ll, axis=-1)),
            (w * R + b, w * P0 * Q),
            now * A * nxt,
            (now * Q, now - nxt * A, nxt * R),
        )

    def extract(out):
        if outputs == "peer":
            return _extract_peer(out)
        return out[1][0], out[1][1], out[0][5]

    return fn, extract


def implementation(impl: str, unroll: int = 1, outputs: str = "all"):
    """``(fn, extract)`` for an implementation name of :data:`IMPLS` or :data:`REFERENCES`;
    ``outputs`` ("all" or "peer") selects what pssm and the references return (peers always
    return their own smoother output)."""
    library, mode = impl.split("-")
    parallel = mode == "par"
    if library == "ours":
        return _ours(parallel, unroll, outputs)
    if library == "hand":
        return _hand_written(outputs)
    if library == "floor":
        return _floor(outputs)
    return {"dynamax": _dynamax, "cuthbert": _cuthbert}[library](parallel)


def arguments(impl: str, model: Model, dtype):
    """The model in the form ``impl`` takes: peers always get dense matrices."""
    import jax.numpy as jnp

    m = model if impl.startswith(("ours", "hand", "floor")) else as_dense(model)
    return tuple(jnp.asarray(x, dtype) for x in m)


# ------------------------------------------------------------------------------------------
# Worker side: jobs run in a separate process (see benchmarks._timing.Worker)


def _accuracy(job):
    import jax

    d, structure, T, batch = job["d"], job["structure"], job["T"], job["batch"]
    with jax.enable_x64(True):
        model = make_model(structure, d, T, batch, seed=1)
        results = {}
        for impl in job["impls"]:
            fn, extract = implementation(impl)
            out = jax.jit(fn)(*arguments(impl, model, np.float64))
            mean, cov, ll = (np.asarray(x, np.float64) for x in extract(out))
            if cov.ndim == 3:  # ours on the diag model: per-coordinate variances
                cov = cov[..., None] * np.eye(d)
            results[impl] = (mean, cov, ll)
    ref_mean, ref_cov, ref_ll = results["ours-seq"]
    for impl in job["impls"]:
        if impl == "ours-seq":
            continue
        mean, cov, ll = results[impl]
        diffs = {
            "mean": float(np.max(np.abs(mean - ref_mean))),
            "cov": float(np.max(np.abs(cov - ref_cov))),
            "loglik": float(np.max(np.abs(ll - ref_ll))),
        }
        scales = {
            "mean": float(np.max(np.abs(ref_mean))),
            "cov": float(np.max(np.abs(ref_cov))),
            "loglik": float(np.max(np.abs(ref_ll))),
        }
        ok = all(diffs[k] <= 1e-7 * (1.0 + scales[k]) for k in diffs)
        yield {
            "record": dict(
                d=d,
                structure=structure,
                T=T,
                batch=batch,
                impl=impl,
                against="ours-seq",
                max_abs_diff=diffs,
                scale=scales,
                agree=ok,
            ),
            "allow_s": job["allow_s"],
        }


def _time(job):
    import jax.numpy as jnp

    from benchmarks import _timing

    impl, d, T, batch = job["impl"], job["d"], job["T"], job["batch"]
    unroll, budget, max_mem = job["unroll"], job["budget"], job["max_mem"]
    fn, extract = implementation(impl, unroll, job["outputs"])
    compiled = None
    for structure in job["structures"]:
        base = dict(impl=impl, structure=structure, d=d, T=T, batch=batch, unroll=unroll)
        args = arguments(impl, make_model(structure, d, T, batch), jnp.float32)
        if compiled is None or impl.startswith("ours"):  # peers: one executable for both
            yield {"start": structure, "phase": "compile", "allow_s": job["compile_budget"]}
            compiled, compile_s = _timing.compile_timed(fn, *args)
            mem = _timing.memory_bytes(compiled)
            if mem is not None and mem > max_mem:
                for s in job["structures"][job["structures"].index(structure) :]:
                    reason = _max_mem_reason(mem, max_mem)
                    yield {"record": dict(base, structure=s, status="skipped", reason=reason)}
                return
        yield {"start": structure, "phase": "warm-up", "allow_s": budget + 10.0}
        load = os.getloadavg()[0]
        warmup = _timing.warm_up(compiled, *args)
        yield {"warmup_s": warmup, "allow_s": budget + 10.0}  # the timed calls
        times, out = _timing.repeat(
            compiled, *args, repeats=job["repeats"], budget_s=budget, warmup_s=warmup
        )
        ll = float(jnp.mean(jnp.asarray(extract(out)[2])))
        yield {
            "record": _ok_record(base, compile_s, warmup, times, mem, load, ll),
            "allow_s": job["compile_budget"] + budget,
        }


def _ok_record(base, compile_s, warmup_s, times, memory_bytes, loadavg, mean_loglik, **extra):
    """The record of one timed configuration."""
    return dict(base, status="ok", compile_s=compile_s, warmup_s=warmup_s, times_s=list(times),
                median_s=statistics.median(times), min_s=min(times), memory_bytes=memory_bytes,
                loadavg=loadavg, mean_loglik=mean_loglik, **extra)  # fmt: skip


def _max_mem_reason(mem: float, max_mem: float) -> str:
    return f"XLA estimates {mem / 2**30:.1f} GiB > {max_mem / 2**30:.1f} GiB"


def _interleave(job):
    """``--interleave``: every implementation of ``job["impls"]`` on one (structure, d, T),
    compiled and warmed up in this process, then timed in rounds that call each once in turn
    (:func:`benchmarks._timing.interleaved`); one record per implementation, as :func:`_time`'s."""
    import jax.numpy as jnp

    from benchmarks import _timing

    d, T, batch, structure = job["d"], job["T"], job["batch"], job["structure"]
    model = make_model(structure, d, T, batch)
    calls, done = {}, {}
    for impl in job["impls"]:
        base = dict(impl=impl, structure=structure, d=d, T=T, batch=batch, unroll=1)
        fn, extract = implementation(impl, 1, job["outputs"])
        args = arguments(impl, model, jnp.float32)
        yield {"start": impl, "phase": "compile", "allow_s": job["compile_budget"]}
        compiled, compile_s = _timing.compile_timed(fn, *args)
        mem = _timing.memory_bytes(compiled)
        if mem is not None and mem > job["max_mem"]:
            reason = _max_mem_reason(mem, job["max_mem"])
            yield {"record": dict(base, status="skipped", reason=reason)}
            continue
        yield {"start": impl, "phase": "warm-up", "allow_s": job["budget"] + 10.0}
        calls[impl] = (compiled, args)
        done[impl] = (base, extract, compile_s, _timing.warm_up(compiled, *args), mem)
    round_s = sum(warmup for _, _, _, warmup, _ in done.values())
    yield {"warmup_s": round_s, "allow_s": 3.0 * job["repeats"] * round_s + 60.0}
    load = os.getloadavg()[0]
    times = _timing.interleaved(calls, job["repeats"])
    for impl, (compiled, args) in calls.items():
        base, extract, compile_s, warmup, mem = done[impl]
        ll = float(jnp.mean(jnp.asarray(extract(compiled(*args))[2])))
        record = _ok_record(base, compile_s, warmup, times[impl], mem, load, ll, interleaved=True)
        yield {"record": record}


def handle(job: dict):
    """Worker entry point: a generator of messages for one job."""
    warnings.filterwarnings("ignore", message=".*Emission covariance has shape.*")
    if job["kind"] == "accuracy":
        yield from _accuracy(job)
    elif job["kind"] == "interleave":
        yield from _interleave(job)
    else:
        yield from _time(job)


# ------------------------------------------------------------------------------------------
# Parent side: plan, skip rules, tables


def skip_reason(impl, structure, d, T, done, budget, max_mem) -> str | None:
    """Why (impl, structure, d, T) is not worth trying, from the configurations already run."""
    smaller = [
        r
        for r in done
        if r["impl"] == impl
        and r["structure"] == structure
        and r["unroll"] == 1
        and r["d"] <= d
        and r["T"] <= T
        and (r["d"], r["T"]) != (d, T)
    ]
    for r in smaller:
        if r["status"] != "ok":
            return f"d={r['d']}, T={r['T']} already skipped"
    same_d = [r for r in smaller if r["status"] == "ok" and r["d"] == d]
    if not same_d:  # a new d is always tried: the hard time limit guards it
        return None
    a = max(same_d, key=lambda r: r["T"])
    growth = T / a["T"]  # sequential and parallel scans both do O(T) work
    t = a["median_s"] * growth
    if t > budget:
        return f"predicted {t:.0f} s per call from T={a['T']} > budget {budget:.0f} s"
    if a.get("memory_bytes") and a["memory_bytes"] * growth > max_mem:
        mem = a["memory_bytes"] * growth
        return f"predicted {mem / 2**30:.1f} GiB from T={a['T']} > {max_mem / 2**30:.1f} GiB"
    return None


STOPS = frozenset({"timeout", "stalled", "died", "error"})  # a worker's final messages


def run_with_retries(worker, next_job, on_message, label, retries=2):
    """Run ``worker.run(next_job())`` until it ends other than by a deadlock, at most ``retries``
    times again in a fresh process after one (no CPU used for a while: jaxlib 0.10's batched
    LAPACK kernels can starve XLA:CPU's thread pool). Every message but a final one goes to
    ``on_message(msg, phase, deadlocks) -> phase`` (``phase`` names the step in progress for the
    reports). ``next_job`` is called once per attempt.

    Returns:
        ``(stop, phase, deadlocks)``: the final message (``None`` when the job finished), the
        phase it stopped in and how many deadlocks were retried.
    """
    deadlocks = 0
    while True:
        stop, phase = None, "starting"
        for msg in worker.run(next_job()):
            if STOPS & msg.keys():
                stop = msg
            else:
                phase = on_message(msg, phase, deadlocks)
        if stop is None or "stalled" not in stop or deadlocks == retries:
            return stop, phase, deadlocks
        deadlocks += 1
        print(f"  {label}: worker deadlocked ({phase}), retrying in a fresh process", flush=True)


def run_accuracy_job(worker, job, retries=2):
    """The float64 agreement records of one (d, structure), retried after a deadlock."""
    records = []

    def next_job():
        records.clear()
        return job

    def on_message(msg, phase, deadlocks):
        r, x = msg["record"], msg["record"]["max_abs_diff"]
        records.append(r)
        print(
            f"  d={r['d']:<4} {r['structure']:<5} {r['impl']:<13} mean {x['mean']:.1e}"
            f"  cov {x['cov']:.1e}  loglik {x['loglik']:.1e}  "
            f"{'ok' if r['agree'] else 'MISMATCH'}",
            flush=True,
        )
        return phase

    label = f"d={job['d']} {job['structure']}"
    stop, _, _ = run_with_retries(worker, next_job, on_message, label, retries)
    if stop is not None:
        print(f"  {label}: accuracy check failed: {stop}", flush=True)
    return records


def run_job(worker, job, structures, base, printer, retries=2):
    """Run a timing job; every structure gets a record (ok or skipped), the job retried after a
    deadlock (:func:`run_with_retries`) for the structures still pending."""
    records, pending = [], list(structures)

    def on_message(msg, phase, deadlocks):
        if "record" in msg:
            rec = dict(msg["record"], deadlocks_retried=deadlocks)
            records.append(rec)
            pending.remove(rec["structure"])
            printer(rec)
        elif "start" in msg:
            phase = "compiling" if msg.get("phase") == "compile" else "warm-up call"
        elif "warmup_s" in msg:
            phase = f"timed calls; warm-up call took {msg['warmup_s']:.2f} s"
        return phase

    label = f"{base['impl']} d={base['d']} T={base['T']}"
    stop, phase, deadlocks = run_with_retries(
        worker, lambda: dict(job, structures=list(pending)), on_message, label, retries
    )
    reason = None if stop is None else _stop_reason(stop, phase, deadlocks + 1)
    for s in pending:
        rec = dict(base, structure=s, status="skipped", reason=reason or "no record")
        records.append(rec)
        printer(rec)
    return records


def _stop_reason(stop: dict, phase: str, deadlocks: int) -> str:
    """Why a worker's job was stopped (a final message of :meth:`benchmarks._timing.Worker.run`)."""
    if "timeout" in stop:
        return f"timed out after {stop['timeout']:.0f} s ({phase})"
    if "stalled" in stop:
        return f"deadlocked {deadlocks} times in XLA:CPU ({phase})"
    if "died" in stop:
        return f"worker died (exit code {stop['died']}, out of memory?)"
    return f"error: {stop['error']}"


def run_interleaved_job(worker, job, printer, retries=2):
    """Run an ``--interleave`` job; every implementation gets a record (ok or skipped), the
    job retried after a deadlock (:func:`run_with_retries`)."""
    records = []

    def next_job():
        records.clear()
        return job

    def on_message(msg, phase, deadlocks):
        if "record" in msg:
            records.append(msg["record"])
        elif "start" in msg:
            phase = f"{msg['phase']} of {msg['start']}"
        elif "warmup_s" in msg:
            phase = "interleaved timed calls"
        return phase

    label = f"d={job['d']} T={job['T']}"
    stop, phase, deadlocks = run_with_retries(worker, next_job, on_message, label, retries)
    got = {r["impl"] for r in records}
    why = "no record" if stop is None else _stop_reason(stop, phase, deadlocks + 1)
    for impl in job["impls"]:
        if impl not in got:
            base = dict(impl=impl, structure=job["structure"], d=job["d"], T=job["T"])
            records.append(dict(base, batch=job["batch"], unroll=1, status="skipped",
                                reason=why))  # fmt: skip
    for r in records:
        printer(r)
    return records


def _print_record(rec):
    tag = f"{rec['impl']:<13} {rec['structure']:<5} d={rec['d']:<4} T={rec['T']:<5}"
    if rec.get("unroll", 1) != 1:
        tag += f" unroll={rec['unroll']}"
    if rec["status"] == "ok":
        print(
            f"  {tag} median {rec['median_s'] * 1e3:10.2f} ms  min {rec['min_s'] * 1e3:10.2f} ms"
            f"  compile {rec['compile_s']:6.2f} s  ({len(rec['times_s'])} runs, "
            f"load {rec['loadavg']:.1f})",
            flush=True,
        )
    else:
        print(f"  {tag} skipped ({rec['reason']})", flush=True)


def _fmt_ms(rec):
    if rec is None:
        return "-"
    if rec["status"] != "ok":
        return "skipped"
    ms = rec["median_s"] * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _ratio(a, b):
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
        return "-"
    return f"{a['median_s'] / b['median_s']:.3g}x"


def _table(header, rows, markdown=False):
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(str(x) for x in r) + " |" for r in lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def print_tables(results, impls, markdown=False):
    timings = [r for r in results["timings"] if r.get("unroll", 1) == 1]
    find = {(r["impl"], r["structure"], r["d"], r["T"]): r for r in timings}
    configs = sorted({(r["d"], r["T"]) for r in timings})
    have = {(r["impl"], r["structure"]) for r in timings}
    for structure in STRUCTURES:
        if not any(r["structure"] == structure for r in timings):
            continue
        print(
            f"\n{structure} model: median ms per call (batch {results['meta']['batch']}, "
            "float32; peers use the same model as dense matrices)"
            if structure == "diag"
            else f"\n{structure} model: median ms per call"
        )
        cols = [*impls, *(r for r in REFERENCES if structure == "diag" and (r, structure) in have)]
        rows = [
            [d, T] + [_fmt_ms(find.get((i, structure, d, T))) for i in cols] for d, T in configs
        ]
        print(_table(["d", "T", *cols], rows, markdown=markdown))
        print("compile s:")
        rows = [
            [d, T]
            + [
                f"{r['compile_s']:.1f}" if r and r["status"] == "ok" else "-"
                for r in (find.get((i, structure, d, T)) for i in cols)
            ]
            for d, T in configs
        ]
        print(_table(["d", "T", *cols], rows, markdown=markdown))
        pairs = [
            (p, o)
            for o in impls
            if o.startswith("ours")
            for p in impls
            if not p.startswith("ours") and p.endswith(o[-3:]) and p in IMPLS
        ]
        refs = [r for r in REFERENCES if any(x["impl"] == r for x in timings)]
        if structure == "diag" and refs:
            print("ratio ours-seq / reference (median; 1 is the reference's speed):")
            rows = [
                [d, T]
                + [
                    _ratio(find.get(("ours-seq", structure, d, T)), find.get((r, structure, d, T)))
                    for r in refs
                ]
                for d, T in configs
            ]
            names = {"hand-seq": "ours / hand-written", "floor-seq": "ours / floor"}
            print(_table(["d", "T", *[names[r] for r in refs]], rows, markdown=markdown))
        if pairs:
            print("ratio peer / ours (median; > 1 means ours is faster):")
            rows = [
                [d, T]
                + [
                    _ratio(find.get((p, structure, d, T)), find.get((o, structure, d, T)))
                    for p, o in pairs
                ]
                for d, T in configs
            ]
            print(_table(["d", "T", *[f"{p}/{o}" for p, o in pairs]], rows, markdown=markdown))
    drift = []
    for r in timings:
        ref = find.get(("ours-seq", r["structure"], r["d"], r["T"]))
        if r["impl"] == "floor-seq":
            continue
        if r["status"] == "ok" and ref and ref["status"] == "ok" and r is not ref:
            rel = abs(r["mean_loglik"] - ref["mean_loglik"]) / abs(ref["mean_loglik"])
            if not rel <= 1e-3:  # also catches NaN
                drift.append(f"  {r['impl']} {r['structure']} d={r['d']} T={r['T']}: {rel:.1e}")
    if drift:
        print("\nfloat32 log-likelihood differs from ours-seq by more than 1e-3 (relative):")
        print("\n".join(drift))
    skipped = [r for r in timings if r["status"] != "ok"]
    if skipped:
        print("\nskipped:")
        for r in skipped:
            print(f"  {r['impl']} {r['structure']} d={r['d']} T={r['T']}: {r['reason']}")
    unroll = results["unroll"]
    if unroll:
        print("\nours-seq on the diag model by scan unroll: median ms (best marked *)")
        us = sorted({r["unroll"] for r in unroll})
        rows = []
        for d, T in sorted({(r["d"], r["T"]) for r in unroll}):
            cells = {r["unroll"]: r for r in unroll if (r["d"], r["T"]) == (d, T)}
            ok = {u: r["median_s"] for u, r in cells.items() if r["status"] == "ok"}
            best = min(ok, key=ok.get) if ok else None
            rows.append([d, T] + [_fmt_ms(cells.get(u)) + ("*" if u == best else "") for u in us])
        print(_table(["d", "T", *[f"unroll={u}" for u in us]], rows, markdown=markdown))


def target_check(results):
    """The issue's targets that this run measured: ratio of medians (and of minima), holds."""
    find = {
        (r["impl"], r["structure"], r["d"], r["T"]): r
        for r in results["timings"]
        if r.get("unroll", 1) == 1
    }
    out = []
    for what, structure, d, T, num, den, bound in TARGETS:
        a, b = find.get((num, structure, d, T)), find.get((den, structure, d, T))
        if not a or not b or a["status"] != "ok" or b["status"] != "ok":
            continue
        ratio = a["median_s"] / b["median_s"]
        out.append(
            dict(
                what=what,
                d=d,
                T=T,
                ratio_median=ratio,
                ratio_min=a["min_s"] / b["min_s"],
                holds=ratio >= bound,
            )
        )
    return out


def _meta(args, cmd):
    versions = {}
    for pkg in ("jax", "jaxlib", "dynamax", "cuthbert", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return dict(
        command=cmd,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=platform.machine(),
        processor=platform.processor(),
        cpu_count=os.cpu_count(),
        loadavg_start=os.getloadavg(),
        versions=versions,
        batch=args.batch,
        dtype="float32",
        repeats=args.repeats,
        budget_s=args.budget,
        compile_budget_s=args.compile_budget,
        max_mem_gb=args.max_mem_gb,
        outputs=args.outputs,
        interleave=args.interleave,
        xla_flags=os.environ.get("XLA_FLAGS"),
        openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
        nproc=os.environ.get("NPROC"),
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="d in {4, 32}, T=256, fewer repeats: a few minutes on 2 cores",
    )
    p.add_argument("--d", type=int, nargs="+", help="latent sizes (default 4 32 230)")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 32 256 2048)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, help="timed calls after warm-up (default 5, quick 3)")
    p.add_argument(
        "--peers",
        default="dynamax,cuthbert",
        help="comma-separated subset of dynamax,cuthbert; 'none' for ours only",
    )
    p.add_argument("--structures", default="diag,dense", help="comma-separated: diag,dense")
    p.add_argument("--modes", default="seq,par", help="comma-separated: seq,par")
    p.add_argument(
        "--budget", type=float, help="seconds of run time per configuration (default 60, quick 10)"
    )
    p.add_argument(
        "--compile-budget",
        type=float,
        default=180.0,
        help="seconds allowed for one compilation before the job is killed",
    )
    p.add_argument("--max-mem-gb", type=float, default=6.0)
    p.add_argument(
        "--no-cpu-workaround",
        action="store_true",
        help="do not set OPENBLAS_NUM_THREADS=1, NPROC=8 and " + CPU_WORKAROUND_FLAG + " for the "
        "worker "
        "(without them jaxlib 0.10's batched LAPACK kernels deadlock XLA:CPU's thread pool on "
        "2 cores; see benchmarks/README.md)",
    )
    p.add_argument(
        "--unroll",
        type=int,
        nargs="*",
        help="scan unroll factors for ours-seq on the diag model (default 1 2 4 8)",
    )
    p.add_argument(
        "--accuracy-d",
        type=int,
        nargs="*",
        help="latent sizes of the float64 agreement check (default: --d; quick: 4); none skips it",
    )
    p.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="do not time the hand-written smoother and the memory floor (diag model)",
    )
    p.add_argument(
        "--outputs",
        choices=("all", "peer"),
        default="all",
        help="what pssm's smoother and the references return in the timed calls: 'all' "
        "(SmootherResult: predicted, filtered, smoothed moments, cross-covariances, backward "
        "conditionals) or 'peer' (what dynamax returns: filtered and smoothed moments, "
        "cross-covariances, log-likelihood; XLA drops the rest)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time all implementations of one (structure, d, T) in one process, in rounds that "
        "call each once in turn (ratios robust to a shared machine's varying load; no "
        "extrapolated skips, only XLA's memory estimate)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--show", type=Path, help="only print the tables of an earlier results file")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = p.parse_args(argv)
    args.d = args.d or ([4, 32] if args.quick else [4, 32, 230])
    args.T = args.T or ([256] if args.quick else [32, 256, 2048])
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.budget = args.budget or (10.0 if args.quick else 60.0)
    if args.accuracy_d is None:
        args.accuracy_d = [4] if args.quick else args.d
    args.unroll = [1, 2, 4, 8] if args.unroll is None else args.unroll
    peers = [] if args.peers == "none" else [x.strip() for x in args.peers.split(",") if x]
    unknown = set(peers) - {"dynamax", "cuthbert"}
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}")
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not modes or modes - {"seq", "par"}:
        p.error("--modes must be among seq,par")
    args.impls = [
        i
        for i in IMPLS
        if (i.startswith("ours") or i.split("-")[0] in peers) and i.split("-")[1] in modes
    ]
    args.structures = [s.strip() for s in args.structures.split(",")]
    if set(args.structures) - set(STRUCTURES):
        p.error(f"--structures must be among {STRUCTURES}")
    return args


def main(argv=None):
    from benchmarks._timing import Worker

    args = parse_args(argv)
    if args.show:
        results = json.loads(args.show.read_text())
        done = {r["impl"] for r in results["timings"]}
        results["target"] = target_check(results)
        report(results, [i for i in IMPLS if i in done], args.markdown)
        return 0
    cmd = " ".join(["python -m benchmarks.kalman", *(sys.argv[1:] if argv is None else argv)])
    max_mem = args.max_mem_gb * 2**30
    os.environ.update(MALLOC_ENV)  # read by glibc when the worker starts (spawned)
    print(
        "worker environment: "
        + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        + " (large buffers stay in malloc's heap: no page faults per call)",
        flush=True,
    )
    if not args.no_cpu_workaround:  # the worker process inherits the environment
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.environ.setdefault("NPROC", str(CPU_WORKAROUND_POOL))
        flags = os.environ.get("XLA_FLAGS", "")
        if CPU_WORKAROUND_FLAG not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {CPU_WORKAROUND_FLAG}".strip()
    results = {"meta": _meta(args, cmd), "accuracy": [], "timings": [], "unroll": []}
    worker = Worker("benchmarks.kalman:handle")
    start = time.perf_counter()
    try:
        if args.accuracy_d:
            print("float64 agreement with ours-seq (T=8, batch 2): max abs difference", flush=True)
            for d in args.accuracy_d:
                for structure in args.structures:
                    job = dict(
                        kind="accuracy",
                        d=d,
                        structure=structure,
                        T=8,
                        batch=2,
                        impls=[i for i in IMPLS if i in args.impls or i == "ours-seq"]
                        + (["hand-seq"] if structure == "diag" else []),
                        allow_s=args.compile_budget * (len(args.impls) + 1),
                    )
                    results["accuracy"] += run_accuracy_job(worker, job)

        print(
            f"\ntiming (batch {args.batch}, float32, {args.repeats} runs after warm-up, "
            f"budget {args.budget:.0f} s run / {args.compile_budget:.0f} s compile)",
            flush=True,
        )
        for d in args.d:
            for T in args.T:
                if args.interleave:
                    for s in args.structures:
                        refs = list(REFERENCES if args.references and s == "diag" else ())
                        job = _time_job(args, None, d, T, [s], 1, max_mem)
                        job.update(kind="interleave", impls=args.impls + refs, structure=s)
                        results["timings"] += run_interleaved_job(worker, job, _print_record)
                    continue
                for impl in args.impls + list(REFERENCES if args.references else ()):
                    base = dict(impl=impl, d=d, T=T, batch=args.batch, unroll=1)
                    todo = []
                    for s in args.structures:
                        if impl in REFERENCES and s != "diag":
                            continue
                        why = skip_reason(impl, s, d, T, results["timings"], args.budget, max_mem)
                        if why:
                            rec = dict(base, structure=s, status="skipped", reason=why)
                            results["timings"].append(rec)
                            _print_record(rec)
                        else:
                            todo.append(s)
                    if todo:
                        job = _time_job(args, impl, d, T, todo, 1, max_mem)
                        results["timings"] += run_job(worker, job, todo, base, _print_record)

        sweep = [(d, T) for d in args.d if d >= 32 for T in args.T if T >= 256]
        if args.unroll and sweep:
            print("\nours-seq unroll sweep on the diag model", flush=True)
            for d, T in sweep:
                for u in args.unroll:
                    base = dict(impl="ours-seq", d=d, T=T, batch=args.batch, unroll=u)
                    job = _time_job(args, "ours-seq", d, T, ["diag"], u, max_mem)
                    results["unroll"] += run_job(worker, job, ["diag"], base, _print_record)
    finally:
        worker.close()

    results["target"] = target_check(results)
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["meta"]["total_s"] = time.perf_counter() - start
    report(results, args.impls, args.markdown)
    bad = [r for r in results["accuracy"] if not r["agree"]]
    if bad:
        print(f"\nWARNING: {len(bad)} accuracy mismatches (see above)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {args.out} ({results['meta']['total_s']:.0f} s)")
    return 1 if bad else 0


def report(results, impls, markdown=False):
    """Print the tables and the target check of a results dict."""
    print_tables(results, impls, markdown)
    targets = results.get("target") or []
    if isinstance(targets, dict):  # results files written before the targets of issue 21
        targets = []
    for t in targets:
        got = t["ratio_median"]
        if t["what"].startswith("diag: ours-seq / hand"):
            got = 1 / got
        print(
            f"target {t['what']} at d={t['d']}, T={t['T']}: {got:.3g} (median) -> "
            f"{'holds' if t['holds'] else 'DOES NOT HOLD'}"
        )


def _time_job(args, impl, d, T, structures, unroll, max_mem):
    return dict(
        kind="time",
        impl=impl,
        d=d,
        T=T,
        batch=args.batch,
        structures=structures,
        unroll=unroll,
        outputs=args.outputs,
        repeats=args.repeats,
        budget=args.budget,
        max_mem=max_mem,
        compile_budget=args.compile_budget,
        allow_s=args.compile_budget + 60.0,  # imports and simulating the data come first
    )


if __name__ == "__main__":
    sys.exit(main())
