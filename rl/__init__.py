"""Reinforcement learning on learned state space models: environments, replay, agents, runner.

Importing ``rl`` first (as the ``pssm`` command and ``python -m rl`` do) applies two CPU
settings before JAX and NumPy start, unless the user has set them: one OpenBLAS thread (jaxlib's
LAPACK calls go to scipy's OpenBLAS, whose own threads oversubscribe 2 busy cores and make a
call take seconds instead of milliseconds) and XLA:CPU's plain scheduler (the setting every
measurement in ``examples/README.md`` was taken with). Neither is needed against the jaxlib 0.10
LAPACK deadlock any more: :mod:`inference.kalman._lapack_guard` removes its cause for every
program, whatever was imported first. ``MUJOCO_GL=egl`` (headless rendering) is set by
:mod:`rl.envs`.
"""

import os as _os

_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (
        _os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    ).strip()
