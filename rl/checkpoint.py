"""Checkpoints of whole runs: the mechanism of :mod:`inference.training.checkpoint`, shared with
the training loop (its module docstring has the layout, the atomic writes and how a damaged
checkpoint is skipped on resume)."""

from inference.training.checkpoint import (
    CheckpointError,
    append_metrics,
    latest,
    others,
    read_metrics,
    remove_temporary,
    restore,
    restore_newest,
    save,
    steps,
    verify,
)

__all__ = [
    "CheckpointError",
    "append_metrics",
    "latest",
    "others",
    "read_metrics",
    "remove_temporary",
    "restore",
    "restore_newest",
    "save",
    "steps",
    "verify",
]
