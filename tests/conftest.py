"""Test configuration: float64 everywhere unless a test asks for float32; hypothesis profiles."""

import os

# Each test process (each xdist worker) is pinned to one core in `pytest_configure` below, the
# workers spread over the cores. One OpenBLAS thread (jaxlib's LAPACK calls go to it; on 2 busy
# cores its own threads oversubscribe) and XLA's plain scheduler, as `rl` sets them. The jaxlib
# 0.10 LAPACK deadlock is prevented by inference/kalman/_lapack_guard.py, not by these settings
# (tests/test_no_hang.py runs a user's script without them, on all cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# XLA backend optimisation level 0: the suite's time is mostly compiling tiny programs; this
# roughly halves compile times at no cost in run time for test-sized inputs.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    + " --xla_backend_optimization_level=0"
).strip()
import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=20, derandomize=True, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code_between_modules():
    """Drop each module's compiled programs when it is done: a worker otherwise accumulates
    gigabytes of executables and tracing caches over the suite, and later compiles slow down."""
    yield
    jax.clear_caches()
    gc.collect()
    gc.freeze()  # what survives is long-lived: later collections need not scan it again


def pytest_configure(config):
    """Pin this test process to one core (see the top of this module).

    An xdist worker ``gwK`` takes core ``K mod n``; the xdist controller (``-n``) is left
    unpinned, since the workers it starts inherit its affinity (pinned at import, it once put
    every worker on the same core: half the machine idle and the suite twice as long); a plain
    run takes the first core.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None and getattr(config.option, "numprocesses", None):
        return  # the controller: runs no test
    cpus = sorted(os.sched_getaffinity(0))
    index = int(worker[2:]) if worker else 0
    os.sched_setaffinity(0, {cpus[index % len(cpus)]})
