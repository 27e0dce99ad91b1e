"""Training: objectives over NumPyro models and guides, and a resumable optax training loop.

Example::

    from numpyro.infer import TraceMeanField_ELBO
    from inference import training

    objective = training.elbo_objective(model, guide, TraceMeanField_ELBO())
    state, history = training.fit(
        objective, {"obs": obs, "actions": actions}, optax.adam(1e-3),
        num_steps=10_000, batch_size=50, key=jax.random.key(0), run_dir="runs/lgssm",
    )
    values = objective.constrain(state.params)   # e.g. positive scales, not their logs

``fit`` jit-compiles up to ``steps_per_call`` updates into one XLA loop, draws minibatches
inside it, logs one metrics record per update (returned and appended to
``run_dir/metrics.jsonl``), checkpoints the whole :class:`TrainState` (:mod:`.checkpoint`:
checksummed, resumed from the newest intact one), resumes it
exactly (``resume=True``), and shards each minibatch over all visible devices.
:func:`best_start` screens several initialisations by a held-out bound and keeps the best
(:mod:`.restarts`).
"""

from .loop import (
    NonFiniteLossError,
    TrainState,
    fit,
    init_train_state,
    restore,
    train_steps,
)
from .objective import ELBOAux, MetricsELBO, Objective, elbo_objective
from .restarts import best_start, check_same_structure, check_screening, restart_seeds

__all__ = [
    "ELBOAux",
    "MetricsELBO",
    "NonFiniteLossError",
    "Objective",
    "TrainState",
    "best_start",
    "check_same_structure",
    "check_screening",
    "elbo_objective",
    "fit",
    "init_train_state",
    "restart_seeds",
    "restore",
    "train_steps",
]
