"""Training-step time against sequence length for RSSM, VRKN and KalMamba at equal latent size.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.world_models --quick       # T in {32, 64, 128}, small sizes
    .venv/bin/python -m benchmarks.world_models               # T in {32, 64, ..., 1024}
    .venv/bin/python -m benchmarks.world_models --preset gpu  # the papers' sizes (latent 230)
    .venv/bin/python -m benchmarks.world_models --preset gpu --jobs 9  # 9 processes: quick, noisier

One training step is one gradient update of the world model's objective (its ELBO with the
reward term) on a batch of ``B`` sequences of length ``T`` of low-dimensional observations and
actions: ``inference.training.train_steps`` with ``num_steps=1``, jitted. Compile time is
measured apart from the median run time (after one warm-up call). The KalMamba paper's claim
(Becker et al. 2024, Fig. 4) is near-logarithmic growth in ``T`` for KalMamba (Mamba backbone
and Kalman filter/smoother through ``lax.associative_scan``) against linear growth for the
recurrent models (RSSM; VRKN, whose transition depends on the filtered mean) on a GPU; on a
2-core CPU a parallel scan does more work than a sequential one and cannot win
(``benchmarks/README.md``). A configuration whose previous ``T`` took longer than ``--budget``
seconds per step is skipped. Results go to ``benchmarks/results/world_models.json``.
"""

import rl  # noqa: F401, I001  (first: its import applies the CPU settings before JAX starts)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks._timing import benchmark  # noqa: E402
from inference import training  # noqa: E402

OBS, ACT = 8, 2


def build(name: str, latent: int, hidden: int):
    """World model ``name`` of the registry (:mod:`rl.models`) with feature size ``latent``
    (the RSSM's split ``stoch = latent / 8``, ``deter`` the rest)."""
    from rl.models import build as build_model
    from rl.presets import PRESETS

    stoch = max(latent // 8, 2)
    sizes = {"latent": latent, "model_hidden": hidden, "stoch": stoch, "deter": latent - stoch,
             "d_model": hidden, "d_state": 16, "conv_depth": 32}  # fmt: skip
    return build_model(name, OBS, ACT, {**PRESETS["gpu"]["*"], **sizes})


def batch(B: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.normal(size=(B, T, OBS)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(B, T, ACT)).astype(np.float32),
        "rewards": rng.normal(size=(B, T)).astype(np.float32),
        "mask": np.ones((B, T), bool),
    }


def step_timing(name: str, latent: int, hidden: int, B: int, T: int, repeats: int, lock_path=None):
    wm = build(name, latent, hidden)
    optimizer = optax.adam(1e-3)
    data = batch(B, T)
    state = training.init_train_state(wm.objective, optimizer, jax.random.key(0), data)

    def one_step(state, data):
        return training.train_steps(wm.objective, optimizer, state, data, 1, batch_size=B)

    return benchmark(one_step, state, data, repeats=repeats, budget_s=30.0, lock_path=lock_path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--models", nargs="+", default=["rssm", "vrkn", "kalmamba"],
                        help="names of the model registry, rl.models.MODELS")  # fmt: skip
    parser.add_argument("--T", nargs="+", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per step to stop")
    parser.add_argument("--out", default="benchmarks/results/world_models.json")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run each (model, T) in its own process, this many at a time, sharing one lock: "
        "compilations overlap (a KalMamba step takes ~1 min to compile on a GPU), timings do "
        "not, but short steps are bound by host-side dispatch and slow down while other processes "
        "compile (with 9 jobs on 16 cores, up to ~4x at small T): compare within one run; the "
        "skip rule of --budget does not apply",
    )
    parser.add_argument(
        "--lock",
        default=None,
        help="a lock file shared by several benchmark processes on one device (e.g. one per "
        "model): they compile concurrently and take the lock for their timed calls only",
    )
    args = parser.parse_args(argv)
    latent, hidden = (230, 300) if args.preset == "gpu" else (32, 64)
    Ts = args.T or ([32, 64, 128] if args.quick else [32, 64, 128, 256, 512, 1024])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.jobs > 1:
        return run_parallel(args, Ts, out)
    device = jax.devices()[0]
    results = {"device": f"{device.platform}: {device.device_kind}", "cpu": platform.processor(),
               "latent": latent, "hidden": hidden, "batch": args.batch, "rows": []}  # fmt: skip
    print(f"device {results['device']}, latent {latent}, hidden {hidden}, batch {args.batch}")
    print("| model | T | compile s | step ms (median) |\n|---|---|---|---|")
    for name in args.models:
        for T in Ts:
            t = step_timing(name, latent, hidden, args.batch, T, args.repeats, args.lock)
            row = {"model": name, "T": T, "compile_s": t.compile_s, "step_ms": 1e3 * t.median_s,
                   "min_ms": 1e3 * t.min_s, "repeats": len(t.times_s)}  # fmt: skip
            results["rows"].append(row)
            print(f"| {name} | {T} | {t.compile_s:.1f} | {1e3 * t.median_s:.1f} |", flush=True)
            out.write_text(json.dumps(results, indent=1))  # after every row: a killed run keeps
            if t.median_s > args.budget:  # what it measured
                print(f"| {name} | > {T} | skipped: step above {args.budget} s |")
                break
    return results


def run_parallel(args, Ts: list[int], out: Path) -> dict:
    """Every ``(model, T)`` of the sweep in a process of its own (this module with ``--jobs 1``),
    ``args.jobs`` at a time, all under one lock file (:func:`benchmarks._timing.exclusive`);
    rows are merged into ``out`` as they finish, so a killed sweep keeps what it measured."""
    lock = args.lock or str(Path(tempfile.gettempdir()) / f"world_models_{os.getpid()}.lock")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # several processes, one GPU
    results = {"rows": [], "failed": []}

    def one(job):
        name, T = job
        part = out.with_name(f"{out.stem}.{name}-{T}.json")
        cmd = [sys.executable, "-m", "benchmarks.world_models", "--preset", args.preset,
               "--models", name, "--T", str(T), "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--lock", lock, "--out", str(part)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return job, part, proc

    print("| model | T | compile s | step ms (median) |\n|---|---|---|---|", flush=True)
    jobs = [(name, T) for name in args.models for T in Ts]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for (name, T), part, proc in pool.map(one, jobs):
            data = json.loads(part.read_text()) if part.exists() else {}
            rows = data.get("rows", [])
            if proc.returncode or not rows:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                results["failed"].append({"model": name, "T": T, "error": " ".join(tail)})
                print(f"| {name} | {T} | failed: {' '.join(tail)} |", flush=True)
            for r in rows:
                print(f"| {name} | {T} | {r['compile_s']:.1f} | {r['step_ms']:.1f} |", flush=True)
            results.update({k: v for k, v in data.items() if k != "rows"})
            results["rows"] += rows
            part.unlink(missing_ok=True)
            out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
