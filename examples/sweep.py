"""Sweeps of agent runs over seeds, aggregated as the papers report them.

Runs every cell of the grid ``agents x models x tasks x variants x seeds`` through the runner
(:func:`rl.runner.run`, one run directory per cell under ``--out``), then aggregates each
configuration's evaluation returns over seeds: the interquartile mean with a 95% stratified
bootstrap interval (:mod:`inference.statistics`; Agarwal et al. 2021, as the KalMamba paper
reports). A killed sweep continues where it stopped: finished cells are read back, an
interrupted cell resumes from its newest intact checkpoint (the runner's exact resume), the
others start. Writes ``table.md``, ``results.json`` and ``returns.png`` (IQM curves with their
intervals as bands) under ``--out``.

    python -m examples.sweep --agents sac,sac-belief --models rssm,vrkn,kalmamba \\
        --variants noisy --seeds 0,1,2 --env-steps 100000 --out runs/sweep-noisy

Model-free agents (``sac``, ``random``) ignore ``--models`` (one cell per seed). Everything
after ``--set`` is passed to each run as in ``pssm run --set``.
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from inference.statistics import stratified_bootstrap
from rl import checkpoint, runner
from rl.cli import parse_overrides
from rl.config import RunConfig, check

MODEL_FREE = ("random", "sac")


def cells(agents, models, tasks, variants, seeds):
    """The grid's cells as ``(agent, model, task, variant, seed)``; model-free agents once."""
    out = []
    for agent, task, variant in itertools.product(agents, tasks, variants):
        for model in [None] if agent in MODEL_FREE else models:
            out += [(agent, model, task, variant, seed) for seed in seeds]
    return out


def cell_name(agent, model, task, variant, seed) -> str:
    parts = [agent, (model or "").replace(":", "."), task, str(variant).lower(), f"s{seed}"]
    return "-".join(p for p in parts if p)


def run_cell(cfg: RunConfig, run_dir: Path) -> dict:
    """The cell's summary: read back when finished, else resumed or started."""
    done = run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("finished") and summary.get("env_steps", 0) >= cfg.env_steps:
            return summary
    resume = bool(checkpoint.steps(run_dir / runner.CHECKPOINTS))
    return runner.run(cfg, run_dir, resume=resume, progress=False, video=False)


def aggregate(results: dict, action_repeat: dict) -> dict:
    """Per configuration: the final returns' IQM and interval, and the IQM curve with bands
    over the evaluation steps all its seeds share."""
    table = {}
    for config, summaries in results.items():
        finals = np.array([s["final_eval_return"] for s in summaries], np.float64)
        ci = stratified_bootstrap(finals)
        common = set.intersection(*({int(k) for k, _ in s["evals"]} for s in summaries))
        steps = sorted(common)
        curve = []
        for step in steps:
            at = np.array([dict((int(k), v) for k, v in s["evals"])[step] for s in summaries])
            c = stratified_bootstrap(at)
            curve.append([step * action_repeat[config], c.estimate, c.low, c.high])
        table[config] = {
            "iqm": ci.estimate, "low": ci.low, "high": ci.high, "seeds": ci.runs,
            "final_returns": finals.tolist(),
            "random": float(np.mean([s["random_return"] for s in summaries])),
            "curve": curve,
        }  # fmt: skip
    return table


def markdown(table: dict) -> str:
    rows = ["| configuration | seeds | final return IQM [95% CI] | per seed | random |",
            "|---|---|---|---|---|"]  # fmt: skip
    for config, r in table.items():
        seeds = ", ".join(f"{x:.0f}" for x in r["final_returns"])
        rows.append(f"| {config} | {r['seeds']} | **{r['iqm']:.0f}** [{r['low']:.0f}, "
                    f"{r['high']:.0f}] | {seeds} | {r['random']:.0f} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for config, r in table.items():
        if not r["curve"]:
            continue
        x, y, lo, hi = np.array(r["curve"]).T
        ax.plot(x, y, label=config)
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return (IQM, 95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    split = lambda text: [t for t in text.split(",") if t]  # noqa: E731
    parser.add_argument("--agents", type=split, default=["sac-belief"])
    parser.add_argument("--models", type=split, default=["vrkn"])
    parser.add_argument("--tasks", type=split, default=["cartpole-swingup"])
    parser.add_argument("--variants", type=split, default=["noisy"])
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in split(t)], default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=5_000, help="agent steps, as pssm run")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    configs = {}
    for agent, model, task, variant, seed in cells(args.agents, args.models, args.tasks,
                                                   args.variants, args.seeds):  # fmt: skip
        cfg = RunConfig(agent=agent, model=model or RunConfig.model, task=task,
                        variant=None if variant.lower() == "none" else variant,
                        preset=args.preset, seed=seed, env_steps=args.env_steps,
                        eval_every=args.eval_every, overrides=overrides)  # fmt: skip
        check(cfg)
        configs[(agent, model, task, variant, seed)] = cfg
    results, repeat = {}, {}
    for (agent, model, task, variant, seed), cfg in configs.items():
        summary = run_cell(cfg, args.out / cell_name(agent, model, task, variant, seed))
        config = cell_name(agent, model, task, variant, seed).rsplit("-s", 1)[0]
        results.setdefault(config, []).append(summary)
        repeat[config] = summary["env_steps"] // max(summary["steps"], 1)
        print(f"{config} seed {seed}: {summary['final_eval_return']:.1f}", flush=True)
    table = aggregate(results, repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(table, indent=1))
    (args.out / "table.md").write_text(markdown(table))
    plot(table, args.out / "returns.png")
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
