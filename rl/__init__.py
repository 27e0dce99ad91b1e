"""Reinforcement learning on learned state space models: environments, replay, agents, runner.

Importing ``rl`` first (as the ``pssm`` command and ``python -m rl`` do) applies two CPU
settings before JAX and NumPy start, unless the user has set them: one OpenBLAS thread and
XLA:CPU's plain scheduler. jaxlib 0.10.2's batched LAPACK kernels can deadlock XLA:CPU's
intra-op pool when independent solves run concurrently; both settings make that rare
(``benchmarks/README.md``). ``MUJOCO_GL=egl`` (headless rendering) is set by :mod:`rl.envs`.
"""

import os as _os

_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (
        _os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    ).strip()
