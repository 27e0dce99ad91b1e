"""Runnable examples; each is also exercised by the tests.

Run them as modules (``python -m examples.<name>``): importing this package first imports
:mod:`rl`, whose import applies the CPU settings (one OpenBLAS thread, XLA:CPU's plain
scheduler) before JAX and NumPy start, unless the user has set them.
"""

import rl as _rl  # noqa: F401  (the CPU settings; nothing else is loaded)
