"""Best of several initialisations, chosen by a held-out bound early in training.

Deep SSM objectives are non-convex, and on some problems a start falls into a worse basin within
the first few thousand updates and never leaves it (the EKVAE pendulum's broken circle of ``a``;
the unsupervised L-VSSF's encoder asserting the velocity from one image). The remedy both
examples use is the same: train each candidate briefly, score it by its bound on held-out data
(never the test set, never ground truth), and continue only the best.
"""

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import numpy as np

R = TypeVar("R")


def restart_seeds(seed: int, restarts: int) -> list[int]:
    """The candidates' seeds ``seed + 1000 k``, ``k < restarts``: candidate 0 is the plain run
    of ``seed``."""
    return [seed + 1000 * k for k in range(restarts)]


def check_screening(restarts: int, screen_steps: int, steps: int) -> None:
    """Raise ``ValueError`` unless ``restarts >= 1`` and, when candidates are screened
    (``restarts > 1``), ``0 < screen_steps <= steps``."""
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    if restarts > 1 and not 0 < screen_steps <= steps:
        raise ValueError(f"screening needs 0 < screen_steps={screen_steps} <= steps={steps}")


def best_start(
    seeds: Sequence[int], screen: Callable[[int], R], score: Callable[[R], float]
) -> tuple[int, R, list[dict]]:
    """Screen every candidate and return the best one's index, its screened run and the
    screening records ``{"seed", "validation_bound", "selected"}``, one per candidate.

    ``screen(seed)`` trains the candidate of ``seed`` for the screening updates and returns its
    run (any value); ``score(run)`` is a held-out bound, higher is better. A non-finite score
    ranks last; when every score is non-finite a :class:`FloatingPointError` names them. Only
    the best run seen so far is kept, so memory does not grow with the number of candidates.
    """
    if len(seeds) == 0:
        raise ValueError("best_start needs at least one candidate")
    scores, best, best_run = [], -1, None
    for k, seed in enumerate(seeds):
        run = screen(seed)
        s = float(score(run))
        scores.append(s)
        if np.isfinite(s) and (best < 0 or s > scores[best]):
            best, best_run = k, run
    if best < 0:
        raise FloatingPointError(f"no candidate has a finite held-out bound: {scores}")
    records = [{"seed": seed, "validation_bound": s, "selected": k == best}
               for k, (seed, s) in enumerate(zip(seeds, scores, strict=True))]  # fmt: skip
    return best, best_run, records


def check_same_structure(reference, other, what: str) -> None:
    """Raise ``ValueError`` unless the pytrees ``reference`` and ``other`` have the same
    structure, leaf shapes and dtypes: candidates that share one compiled update may differ in
    their initial values only."""
    if _signature(reference) != _signature(other):
        raise ValueError(
            f"{what} builds parameters of other names or shapes than the first candidate; "
            "candidates may differ in their initial values only"
        )


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(np.shape(x), getattr(x, "dtype", type(x))) for x in leaves]
