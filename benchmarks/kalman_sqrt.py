"""Square-root dense Kalman smoother speed: ``kalman.sqrt`` against our covariance dense path
and cuthbert's square-root smoother.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.kalman_sqrt --quick      # d in {4, 32}, T = 256
    .venv/bin/python -m benchmarks.kalman_sqrt --d 4 32 64 --T 256 2048

The model is :func:`benchmarks.kalman.make_model`'s dense one (static ``A, b, Q, R, P_0``,
every step observed, ``w_t = z_t + N(0, R)``), float32, a batch of sequences under
``jax.vmap``, parameters passed as jit arguments. Every implementation takes the covariances
and returns its whole smoother output:

- ``sqrt-seq`` / ``sqrt-par``: ``inference.kalman.sqrt.smoother(parallel=False / True)`` on
  the Cholesky factors of ``P_0, Q, R`` (factorised once per call, outside ``vmap``);
- ``cov-seq`` / ``cov-par``: ``inference.kalman.smoother``, the covariance form (``ours-seq`` /
  ``ours-par`` of ``benchmarks/kalman.py``);
- ``cuthbert-seq`` / ``cuthbert-par``: ``cuthbert.filter`` + ``cuthbert.smoother`` with
  ``cuthbert.gaussian.kalman`` (square-root, Yaghoobi et al.), the adapter of
  ``benchmarks/kalman.py`` (a dummy state ``x_{-1}`` carries our prior).

All run in this one process: each compiled (time apart, ``jax.jit(f).lower(...).compile()``)
and called once to warm up, then ``--repeats`` rounds call every implementation once in turn
(the load of a shared machine then varies alike for all); the ratios compare the medians of
the same run (the minima are printed too). Before timing, a float64 instance (``T = 8``,
batch 2) checks that all implementations agree on smoothed means, covariances and the
log-likelihood. The process re-executes itself once with the worker environment of
``benchmarks/kalman.py``: ``OPENBLAS_NUM_THREADS=1``, ``NPROC=8``, XLA:CPU's plain scheduler
and the glibc ``MALLOC_*`` thresholds (fresh output buffers otherwise page-fault on every call).
"""

import argparse
import os
import sys

from benchmarks.kalman import CPU_WORKAROUND_FLAG, CPU_WORKAROUND_POOL, MALLOC_ENV

IMPLS = ("sqrt-seq", "cov-seq", "cuthbert-seq", "sqrt-par", "cov-par", "cuthbert-par")


def _environment_ready() -> bool:
    want = dict(OPENBLAS_NUM_THREADS="1", NPROC=str(CPU_WORKAROUND_POOL), **MALLOC_ENV)
    flags = os.environ.get("XLA_FLAGS", "")
    return CPU_WORKAROUND_FLAG in flags and all(os.environ.get(k) == v for k, v in want.items())


def _reexec_with_environment() -> None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NPROC=str(CPU_WORKAROUND_POOL), **MALLOC_ENV)
    flags = env.get("XLA_FLAGS", "")
    if CPU_WORKAROUND_FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} {CPU_WORKAROUND_FLAG}".strip()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.kalman_sqrt", *sys.argv[1:]], env)


def implementation(impl: str):
    """``fn(m0, P0, A, b, Q, R, w)`` on a batch ``w (batch, T, d)``, and ``extract(out) ->
    (smoothed means, smoothed covariances, log-likelihoods)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.kalman import _cuthbert, _ours
    from inference import kalman

    library, mode = impl.split("-")
    parallel = mode == "par"
    if library == "cov":
        return _ours(parallel)
    if library == "cuthbert":
        return _cuthbert(parallel)

    def fn(m0, P0, A, b, Q, R, w):
        prior = kalman.sqrt.SqrtGaussian(m0, jnp.linalg.cholesky(P0))
        dynamics = kalman.sqrt.SqrtDynamics(A, b, jnp.linalg.cholesky(Q))
        LR = jnp.linalg.cholesky(R)

        def one(w):
            emissions = kalman.sqrt.SqrtEmissions(w, LR)
            return kalman.sqrt.smoother(prior, dynamics, emissions, parallel=parallel)

        return jax.vmap(one)(w)

    def extract(out):
        L = np.asarray(out.smoothed.chol, np.float64)
        return out.smoothed.mean, L @ np.swapaxes(L, -1, -2), out.log_likelihood

    return fn, extract


def check_accuracy(d: int) -> list[str]:
    """Float64 agreement of every implementation with ``cov-seq`` (``T = 8``, batch 2)."""
    import jax
    import numpy as np

    from benchmarks.kalman import make_model

    lines = []
    with jax.enable_x64(True):
        model = make_model("dense", d, 8, 2, seed=1)
        results = {}
        for impl in IMPLS:
            fn, extract = implementation(impl)
            out = jax.jit(fn)(*(np.asarray(x, np.float64) for x in model))
            results[impl] = [np.asarray(x, np.float64) for x in extract(out)]
    ref = results["cov-seq"]
    for impl in IMPLS:
        diffs = [float(np.abs(a - r).max()) for a, r in zip(results[impl], ref, strict=True)]
        scales = [float(np.abs(r).max()) for r in ref]
        ok = all(x <= 1e-7 * (1.0 + s) for x, s in zip(diffs, scales, strict=True))
        lines.append(
            f"| {d} | {impl} | {diffs[0]:.1e} | {diffs[1]:.1e} | {diffs[2]:.1e} | "
            f"{'yes' if ok else 'NO'} |"
        )
    return lines


def time_all(d: int, T: int, batch: int, repeats: int, impls) -> dict:
    """``{impl: benchmarks._timing.Timing}`` on the float32 dense model: every implementation
    compiled (timed apart) and called once to warm up, then ``repeats`` rounds that call each
    once in turn, so that the load of the shared machine varies alike for all of them."""
    import jax.numpy as jnp

    from benchmarks import _timing
    from benchmarks.kalman import make_model

    args = tuple(jnp.asarray(x, jnp.float32) for x in make_model("dense", d, T, batch))
    compiled, compile_s, warmup_s = {}, {}, {}
    for impl in impls:
        compiled[impl], compile_s[impl] = _timing.compile_timed(implementation(impl)[0], *args)
        warmup_s[impl] = _timing.warm_up(compiled[impl], *args)
    times = _timing.interleaved({impl: (compiled[impl], args) for impl in impls}, repeats)
    out = {
        impl: _timing.Timing(compile_s[impl], warmup_s[impl], times[impl], None) for impl in impls
    }
    for impl, t in out.items():
        print(
            f"  d={d:4d} T={T:5d} {impl:13s} compile {t.compile_s:6.2f} s   "
            f"median {1e3 * t.median_s:9.2f} ms   min {1e3 * t.min_s:9.2f} ms",
            flush=True,
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="d in {4, 32}, T = 256, 5 rounds")
    p.add_argument("--d", type=int, nargs="+")
    p.add_argument("--T", type=int, nargs="+")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int)
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    args = p.parse_args(argv)
    args.d = args.d or ([4, 32] if args.quick else [4, 32, 64])
    args.T = args.T or ([256] if args.quick else [256, 2048])
    args.repeats = args.repeats or (5 if args.quick else 9)
    impls = [i for i in IMPLS if i in args.impls.split(",")]

    import jax

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    if args.accuracy:
        print("\nfloat64 agreement with cov-seq (T = 8, batch 2), max abs differences:\n")
        print("| d | impl | smoothed means | smoothed covariances | log-likelihood | ok |")
        print("|---|---|---|---|---|---|")
        for d in sorted({4, *args.d[:1]}):
            print("\n".join(check_accuracy(d)), flush=True)
    print(f"\ntiming (float32, batch {args.batch}):")
    rows = []
    for d in args.d:
        for T in args.T:
            t = time_all(d, T, args.batch, args.repeats, impls)
            rows.append((d, T, t))
    print(
        "\n| d | T | impl | compile (s) | median (ms) | min (ms) | / cov same driver | "
        "/ cuthbert same driver |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d, T, t in rows:
        for impl in impls:
            mode = impl.split("-")[1]
            ratios = [
                f"{t[impl].median_s / t[o].median_s:.2f}" if o in t else "-"
                for o in (f"cov-{mode}", f"cuthbert-{mode}")
            ]
            print(
                f"| {d} | {T} | {impl} | {t[impl].compile_s:.1f} | {1e3 * t[impl].median_s:.2f} "
                f"| {1e3 * t[impl].min_s:.2f} | {ratios[0]} | {ratios[1]} |"
            )
    for d, T, t in rows:
        if {"sqrt-seq", "cov-seq", "cuthbert-seq"} <= set(t):
            vs_cov = t["sqrt-seq"].median_s / t["cov-seq"].median_s
            vs_cut = t["sqrt-seq"].median_s / t["cuthbert-seq"].median_s
            print(
                f"target d={d} T={T}: sqrt-seq / cov-seq {vs_cov:.2f} (<= 2: "
                f"{'holds' if vs_cov <= 2 else 'DOES NOT HOLD'}), sqrt-seq / cuthbert-seq "
                f"{vs_cut:.2f} (< 1: {'holds' if vs_cut < 1 else 'DOES NOT HOLD'})"
            )
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    if not _environment_ready():
        _reexec_with_environment()
    sys.exit(main())
