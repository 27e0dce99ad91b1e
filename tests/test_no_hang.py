"""The library never hangs: the jaxlib 0.10 batched LAPACK deadlock (kalman/_lapack_guard.py).

The user-level script (tests/hang_script.py) hung on its first call on this 2-core machine
without the guard, every time; with it, it finishes. The structural test checks the property
the guard relies on, in the compiled program: no LAPACK call is large enough for jaxlib to
fan it out over the thread pool.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import solve_triangular

from inference.kalman import _lapack_guard

ROOT = Path(__file__).resolve().parents[1]
#: jaxlib splits a batched call when batch * cost_per_matrix reaches this (lapack_kernels.cc)
JAXLIB_SPLIT = 200_000


def _lapack_calls(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(target, first operand's shape) of every LAPACK custom call in compiled HLO text."""
    calls = []
    for line in hlo.splitlines():
        target = re.search(r'custom_call_target="(lapack_\w+)"', line)
        if target:
            shape = re.search(r"custom-call\(\s*f\d+\[([\d,]*)\]", line)
            dims = tuple(int(s) for s in shape.group(1).split(",")) if shape else ()
            calls.append((target.group(1), dims))
    return calls


@pytest.mark.skipif(
    not _lapack_guard.GUARDED,
    reason="guard not installed: jaxlib >= 0.11 (no LAPACK fan-out) or PSSM_LAPACK_GUARD=0",
)
@pytest.mark.parametrize("batch", [7, 4096, 4099])
def test_no_lapack_call_is_fanned_out_and_results_are_exact(batch):
    d = 32
    rng = np.random.default_rng(batch)
    M = rng.normal(size=(batch, d, d))
    S = M @ np.swapaxes(M, -1, -2) + d * np.eye(d)
    B = rng.normal(size=(batch, d, 3))

    def f(S, B):
        L = jnp.linalg.cholesky(S)
        return L, solve_triangular(L, B, lower=True), jnp.linalg.solve(S, B)

    compiled = jax.jit(f).lower(S, B).compile()
    calls = _lapack_calls(compiled.as_text())
    assert {t for t, _ in calls} >= {"lapack_dpotrf_ffi", "lapack_dtrsm_ffi", "lapack_dgetrf_ffi"}
    for target, dims in calls:
        n = int(np.prod(dims[:-2]))
        cost = {"potrf": d**3 // 3, "getrf": d**3}.get(target[8:13], d * d * d)
        assert n * cost < JAXLIB_SPLIT or n == 1, (target, dims)
    L, X, Y = compiled(S, B)
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X, np.linalg.solve(np.linalg.cholesky(S), B), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(Y, np.linalg.solve(S, B), rtol=1e-9, atol=1e-12)


def _run_user_script(args, timeout, guard=True):
    """The script in a fresh process as a user runs it: all cores (the suite pins itself to
    one), none of the project's CPU settings, ``rl`` not imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    env["PSSM_LAPACK_GUARD"] = "1" if guard else "0"
    cpus = set(range(os.cpu_count() or 1))
    pin = hasattr(os, "sched_setaffinity")
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hang_script.py"), *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if pin else None,
    )


def test_user_script_with_dense_smoother_finishes():
    out = _run_user_script([4, 50, 256, 30], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ") and np.isfinite(float(out.stdout.split()[1]))


@pytest.mark.slow
def test_user_script_repeated_and_the_unguarded_control_hangs():
    """20 fresh processes at two sizes finish; the same script without the guard does not."""
    for i in range(20):
        args = [4, 50, 256, 5] if i % 2 else [32, 64, 16, 5]
        out = _run_user_script(args, timeout=300)
        assert out.returncode == 0 and out.stdout.startswith("ok "), (i, out.stderr[-2000:])
    if _lapack_guard.GUARDED:
        with pytest.raises(subprocess.TimeoutExpired):
            _run_user_script([4, 50, 256, 5], timeout=90, guard=False)
