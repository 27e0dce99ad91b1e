"""Timing helpers shared by the benchmarks.

Two pieces:

- :func:`benchmark`: compile time measured apart (``jax.jit(fn).lower(*args).compile()``), one
  warm-up call, then the median (and minimum) of timed repeats, each ended by
  ``jax.block_until_ready``. Repeats are cut short when a time budget would be exceeded.
  :func:`interleaved` times several compiled functions in rounds, each called once per round.
- :class:`Worker`: runs jobs in a separate process with a hard time limit, so that one
  pathological configuration (an XLA call cannot be interrupted from Python) is killed and
  reported as skipped instead of hanging the whole benchmark.
"""

import contextlib
import fcntl
import importlib
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax


class Timing(NamedTuple):
    """Wall-clock seconds of one jitted function on fixed arguments."""

    compile_s: float
    warmup_s: float
    times_s: tuple[float, ...]
    memory_bytes: int | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)


def compile_timed(fn: Callable, *args) -> tuple[Any, float]:
    """``jax.jit(fn)`` lowered and compiled for ``args``; returns (executable, seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def memory_bytes(compiled) -> int | None:
    """XLA's own estimate of the executable's footprint (temporaries + outputs + arguments)."""
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def warm_up(compiled, *args) -> float:
    """Seconds of the first call after compiling (allocations, caches), not counted as a run."""
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def repeat(
    compiled, *args, repeats: int, budget_s: float | None = None, warmup_s: float = 0.0
) -> tuple[tuple[float, ...], Any]:
    """Up to ``repeats`` timed calls, at least one, fewer when ``budget_s`` (which the warm-up
    call of ``warmup_s`` seconds already used) would be exceeded; returns the seconds and the
    last output."""
    if budget_s is not None:
        left = budget_s - warmup_s
        repeats = max(1, min(repeats, int(left / max(warmup_s, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return tuple(times), out


def time_compiled(
    compiled, *args, repeats: int, budget_s: float | None = None
) -> tuple[float, tuple[float, ...], Any]:
    """Warm-up, then :func:`repeat`; returns warm-up seconds, timed seconds, last output."""
    warmup = warm_up(compiled, *args)
    times, out = repeat(compiled, *args, repeats=repeats, budget_s=budget_s, warmup_s=warmup)
    return warmup, times, out


def interleaved(calls: dict[str, tuple[Any, tuple]], repeats: int) -> dict[str, tuple[float, ...]]:
    """Seconds of ``repeats`` rounds that call each compiled function of ``calls``
    (``{name: (compiled, args)}``, warmed up) once in turn: on a shared machine the load varies
    alike for all of them, so ratios of the same run compare like with like."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (compiled, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: tuple(t) for name, t in times.items()}


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike | None):
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block; no-op for
    ``None``. Benchmark processes that share one accelerator take it around their *timed* calls
    only, so their compilations (host work) overlap while no two of them time at once."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def benchmark(
    fn: Callable,
    *args,
    repeats: int = 5,
    budget_s: float | None = None,
    lock_path: str | os.PathLike | None = None,
) -> Timing:
    """Compile ``fn`` for ``args`` and time it (see the module docstring); the warm-up and timed
    calls run under :func:`exclusive` ``(lock_path)``."""
    compiled, compile_s = compile_timed(fn, *args)
    with exclusive(lock_path):
        warmup, times, _ = time_compiled(compiled, *args, repeats=repeats, budget_s=budget_s)
    return Timing(compile_s, warmup, times, memory_bytes(compiled))


# ------------------------------------------------------------------------------------------
# Jobs in a separate process under a hard time limit.


def _worker_main(conn, handler: str) -> None:
    module, name = handler.split(":")
    fn = getattr(importlib.import_module(module), name)
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            for message in fn(job):
                conn.send(message)
        except Exception as err:  # report, keep serving
            conn.send({"error": f"{type(err).__name__}: {err}"})
        conn.send(None)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads (Linux ``/proc``; else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Worker:
    """A spawned process that runs ``handler(job)`` (a generator of dict messages) per job.

    ``handler`` is given as ``"module:function"`` so the child can import it. A job is a dict
    whose ``"allow_s"`` bounds the time to its first message; every message may carry its own
    ``"allow_s"``, the time allowed until the next one. A job that overruns, or whose process
    uses no CPU for ``stall_s`` seconds while it should be working (a deadlock), is killed
    (only this worker's own process, by its pid) and a fresh process serves the next job.
    """

    def __init__(self, handler: str, stall_s: float | None = 10.0):
        self.handler = handler
        self.stall_s = stall_s
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.handler), daemon=True)
        self.proc.start()
        child.close()

    def _wait(self, allow: float) -> dict | None:
        """Wait for a message; None when one is ready, else why waiting stopped."""
        start = time.monotonic()
        cpu, since = _cpu_seconds(self.proc.pid), start
        while True:
            left = allow - (time.monotonic() - start)
            if left <= 0:
                return {"timeout": allow}
            if self.conn.poll(min(left, 1.0)):
                return None
            now, used = time.monotonic(), _cpu_seconds(self.proc.pid)
            if used is None or cpu is None or used - cpu > 0.05:
                cpu, since = used, now
            elif self.stall_s is not None and now - since > self.stall_s:
                return {"stalled": now - since}

    def run(self, job: dict) -> Iterator[dict]:
        """Yield the job's messages; a final ``{"timeout": s}``, ``{"stalled": s}`` or
        ``{"died": code}`` when it had to be stopped."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(job)
        allow = job["allow_s"]
        while True:
            stop = self._wait(allow)
            if stop is not None:
                self.kill()
                yield stop
                return
            try:
                message = self.conn.recv()
            except EOFError:
                code = self.proc.exitcode
                self.kill()
                yield {"died": code}
                return
            if message is None:
                return
            allow = message.get("allow_s", allow)
            yield message

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
        self.kill()
