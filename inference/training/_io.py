"""Run-directory I/O: orbax checkpoints of the whole train state and the metrics JSON-lines file.

Layout of a run directory::

    run_dir/checkpoints/<step>/   orbax checkpoint of the TrainState after <step> updates
    run_dir/metrics.jsonl         one JSON object per update: {"step": k, "loss": ..., ...}
"""

import json
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def checkpoint_manager(
    run_dir: str | os.PathLike, max_to_keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
    """An orbax manager for ``run_dir/checkpoints`` keeping the latest ``max_to_keep`` steps
    (and removing partial saves of a killed process)."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_DIR, options=options)


def save_state(manager: ocp.CheckpointManager, state: Any) -> None:
    """Save ``state`` under its own step unless that step is already saved (asynchronous)."""
    step = int(state.step)
    if step not in manager.all_steps():
        manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_state(manager: ocp.CheckpointManager, template: Any, step: int | None = None) -> Any:
    """Restore the checkpoint at ``step`` (default: latest) into the structure of ``template``.

    Arrays come back with ``template``'s dtypes, shapes and shardings.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {manager.directory}")
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(template))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} does not match the train state built by "
            "this objective and optimizer (different model, guide or optimizer?)"
        ) from error


def read_metrics(run_dir: str | os.PathLike, up_to_step: int) -> list[dict]:
    """Metric records of ``run_dir/metrics.jsonl`` with ``step <= up_to_step``, and rewrite the
    file to hold exactly those (the history a resumed run continues)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.exists():
        with path.open() as file:
            for line in file:
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= up_to_step:
                        records.append(record)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as file:
        file.writelines(_to_line(record) for record in records)
    os.replace(tmp, path)
    return records


def append_metrics(run_dir: str | os.PathLike, records: list[dict]) -> None:
    """Append records to ``run_dir/metrics.jsonl`` and flush."""
    with (Path(run_dir) / METRICS_FILE).open("a") as file:
        file.writelines(_to_line(record) for record in records)
        file.flush()


def _to_line(record: dict) -> str:
    # NaN / inf are written as JSON's common extension (NaN, Infinity), which json.loads reads.
    return json.dumps(record) + "\n"
