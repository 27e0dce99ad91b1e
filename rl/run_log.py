"""A run's metric log: ``metrics.jsonl`` and TensorBoard event files of the same records.

Every record is a dict with ``"step"`` (agent steps) and ``"kind"`` (``"random"``,
``"episode"``, ``"train"``, ``"eval"``, ``"note"``). It is appended to ``metrics.jsonl`` and each
of its numbers is written to ``tensorboard/`` as the scalar ``<kind>/<name>`` at the
environment step ``step * action_repeat`` (the papers' unit):
``tensorboard --logdir runs/`` shows every run side by side.

Resuming from a checkpoint at step ``S`` keeps the records up to ``S`` (a torn final line is
dropped with a warning, :func:`inference.training.checkpoint.read_metrics`) and opens the event
files with TensorBoard's *purge step* just past ``S``, so the events a killed run wrote after
its checkpoint are hidden and every step appears once.
"""

from pathlib import Path

import jax
import numpy as np

from . import checkpoint

METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"
_NOT_SCALARS = ("step", "kind", "episode", "env_steps")


class RunLog:
    """``metrics.jsonl`` and TensorBoard events of the run in ``run_dir``.

    Args:
        run_dir: the run's directory (it exists).
        action_repeat: simulator steps per agent step (TensorBoard's step unit).
        resumed_at: the step of the checkpoint resumed from; ``None`` starts a new log.
        tensorboard: write event files too.
    """

    def __init__(
        self,
        run_dir: Path,
        action_repeat: int,
        resumed_at: int | None = None,
        tensorboard: bool = True,
    ):
        self.path = Path(run_dir) / METRICS
        self.repeat = action_repeat
        if resumed_at is None:
            self.path.write_text("")
            self.records = []
        else:
            self.records = checkpoint.read_metrics(self.path, resumed_at)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = 0 if resumed_at is None else (resumed_at + 1) * action_repeat
            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD), purge_step=purge)

    def write(self, record: dict) -> None:
        """Append ``record`` (NumPy and JAX scalars become floats)."""
        record = {k: (float(v) if isinstance(v, np.floating | jax.Array) else v)
                  for k, v in record.items()}  # fmt: skip
        self.records.append(record)
        checkpoint.append_metrics(self.path, [record])
        if self.writer is None:
            return
        for name, value in record.items():
            if name in _NOT_SCALARS or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                step = record["step"] * self.repeat
                self.writer.add_scalar(f"{record['kind']}/{name}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
