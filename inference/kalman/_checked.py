"""Opt-in value checks under ``jit`` / ``vmap``: :func:`checked`.

Outside ``jit`` the kernels check the values of their inputs eagerly (:mod:`._validate`).
Under a trace the values are unknown, so the same checks are staged into the program as
``jax.experimental.checkify.debug_check`` s, which are dropped when it is compiled, unless the
program runs through :func:`checked`, which functionalizes them with ``checkify`` (they then run
inside the compiled code, with its other work) and raises the first failure when it returns.
"""

import functools
from collections.abc import Callable

import jax
from jax.experimental import checkify


def checked(fn: Callable) -> Callable:
    """``fn`` with the value checks of :mod:`inference.kalman` run even under ``jit``/``vmap``.

    The checks (NaN or inf in observed data and in parameters, variances that are not positive
    or covariances not positive definite, masks that are not boolean or 0/1; the same ones that
    concrete inputs get eagerly) are run inside the traced program by
    ``jax.experimental.checkify``; ``pssm.core.check_inputs`` stages its checks on the models'
    data the same way. Wrap the outermost function and jit inside, so that it is compiled
    once::

        @jax.jit
        def loglik(w, R):
            return kalman.filter(prior, dynamics, kalman.Emissions(w, R)).log_likelihood

        kalman.checked(loglik)(w, R)  # ValueError "R must be positive ..." for a zero variance

    Without ``checked`` the checks cost nothing. With it the results are the same; the checks
    add their reductions (and a Cholesky factorisation per dense covariance) to the program.

    Args:
        fn: any function of arrays that calls the kernels, jitted, vmapped or not.

    Returns:
        A function with ``fn``'s signature and results. It raises ``ValueError`` (checkify's
        ``JaxRuntimeError``) with the failed check's message and where it was staged. Call it
        outside ``jit`` (an error can only be raised once the values are known); inside a
        trace it raises ``TypeError``.
    """
    run = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def checked_fn(*args, **kwargs):
        error, out = run(*args, **kwargs)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(error)):
            raise TypeError(
                "kalman.checked(f) was called under a trace (jit, vmap, grad, ...): its "
                "errors can only be raised outside. Apply the transformation inside instead, "
                "kalman.checked(jax.jit(f))"
            )
        error.throw()
        return out

    return checked_fn
