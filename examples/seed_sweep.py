"""Seed sweeps of the identification examples: one example's command on several seeds, each
metric reported as its mean over seeds with a 95% bootstrap interval.

Runs ``python -m examples.<example> <arguments> --seed S --out <out>/s<S>`` for every seed
whose run has not finished (a finished run has written ``results.json``; each example writes
it last), one process per seed, then aggregates the rows of every ``results.json``: rows are
matched across seeds by their text fields (``pendulum_sysid``: model and latent set;
``lvssf_pendulum``: configuration), and every numeric field is reported as

    mean over seeds   [2.5%, 97.5%] percentile bootstrap interval of the mean   (min, max)

(:func:`inference.statistics.stratified_bootstrap` with the mean as statistic: the same
estimator as the RL sweep of :mod:`examples.sweep`, with one task column). A killed sweep
continues with its unfinished seeds: finished ones are read back, an interrupted one starts
again. Each seed's command is recorded in ``<out>/s<S>/command.json``; a finished run made by
another command is refused, so one directory never mixes configurations. Writes ``table.md``
and ``results.json`` under ``--out``.

    python -m examples.seed_sweep pendulum_sysid --seeds 0,1,2,3,4 \\
        --out runs/seeds-vrkn128 -- --models vrkn --latent 128 --steps 15000 --no-progress
    python -m examples.seed_sweep lvssf_pendulum --seeds 0,1,2,3,4 \\
        --out runs/seeds-lvssf -- --configs none-known,partial-known,full-known
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from inference.statistics import mean, stratified_bootstrap

EXAMPLES = ("pendulum_sysid", "lvssf_pendulum")


def command(example: str, arguments: list[str], seed: int, out: Path) -> list[str]:
    """The command line of one seed's run."""
    return [sys.executable, "-m", f"examples.{example}", *arguments, "--seed", str(seed),
            "--out", str(out)]  # fmt: skip


def run_seed(example: str, arguments: list[str], seed: int, out: Path) -> list[dict]:
    """The rows of the seed's ``results.json``: read back when finished, else run."""
    cmd = command(example, arguments, seed, out)
    recorded, results = out / "command.json", out / "results.json"
    wanted = {"example": example, "arguments": arguments, "seed": seed}
    if results.is_file():
        made_by = json.loads(recorded.read_text()) if recorded.is_file() else None
        if made_by != wanted:
            raise ValueError(f"{out} holds a run of {made_by}, not of {wanted}: use another --out")
        return json.loads(results.read_text())["rows"]
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(wanted))
    subprocess.run(cmd, check=True)
    return json.loads(results.read_text())["rows"]


def row_key(row: dict) -> str:
    """A row's identity across seeds: its text fields, in order (e.g. ``"vrkn / filtered"``)."""
    return " / ".join(str(v) for v in row.values() if isinstance(v, str))


def is_metric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(rows_per_seed: dict[int, list[dict]]) -> dict:
    """``{row key: {metric: {mean, low, high, min, max, per_seed}}}`` over the seeds; a metric
    enters only where every seed reports it (finite), with the seeds' values in seed order."""
    seeds = sorted(rows_per_seed)
    by_key = [{row_key(r): r for r in rows_per_seed[s]} for s in seeds]
    table = {}
    for key in by_key[0]:
        if not all(key in rows for rows in by_key):
            continue
        metrics = {}
        for name in by_key[0][key]:
            values = [rows[key].get(name) for rows in by_key]
            if not all(is_metric(v) and np.isfinite(v) for v in values):
                continue
            ci = stratified_bootstrap(np.array(values, np.float64), statistic=mean)
            metrics[name] = {"mean": ci.estimate, "low": ci.low, "high": ci.high,
                             "min": float(min(values)), "max": float(max(values)),
                             "per_seed": [float(v) for v in values]}  # fmt: skip
        table[key] = metrics
    return {"seeds": seeds, "rows": table}


def markdown(result: dict, metrics: list[str] | None = None) -> str:
    """One line per row key and metric: mean [95% CI] (min, max) over the seeds."""
    seeds = result["seeds"]
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean [95% bootstrap CI] "
             "(min, max) over seeds", "", "| row | metric | mean [95% CI] | min, max |",
             "|---|---|---|---|"]  # fmt: skip
    for key, row in result["rows"].items():
        for name, m in row.items():
            if metrics is None or name in metrics:
                lines.append(f"| {key} | {name} | **{m['mean']:.4g}** [{m['low']:.4g}, "
                             f"{m['high']:.4g}] | {m['min']:.4g}, {m['max']:.4g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("example", choices=EXAMPLES)
    parser.add_argument("--seeds", default="0,1,2,3,4",
                        type=lambda t: [int(s) for s in t.split(",") if s])  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    names = lambda t: [m for m in t.split(",") if m]  # noqa: E731
    parser.add_argument("--metrics", default=None, type=names,
                        help="metrics in table.md (default: every numeric field)")  # fmt: skip
    args = parser.parse_args(own)
    if clash := {"--seed", "--out"} & set(passed):
        parser.error(f"the sweep sets {sorted(clash)} for each seed; leave them out after --")
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        parser.error(f"--seeds must be distinct and non-empty, got {args.seeds}")
    rows = {s: run_seed(args.example, passed, s, args.out / f"s{s}") for s in args.seeds}
    result = {"example": args.example, "arguments": passed, **aggregate(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "table.md").write_text(markdown(result, args.metrics))
    print(markdown(result, args.metrics))
    return result


if __name__ == "__main__":
    main()
