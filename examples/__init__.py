"""Runnable examples; each is also exercised by the tests.

Run them as modules (``python -m examples.<name>``): importing this package first applies two
CPU settings before JAX and NumPy start, unless the user has set them (as :mod:`rl` does for
the agents): one OpenBLAS thread and XLA:CPU's plain scheduler. jaxlib 0.10.2's batched LAPACK
kernels can deadlock XLA:CPU's intra-op pool when independent solves run concurrently; both
settings make that rare (``benchmarks/README.md``).
"""

import os as _os

_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (
        _os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    ).strip()
