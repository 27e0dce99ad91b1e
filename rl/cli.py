"""``pssm run``: the runner from the command line (and ``python -m rl``).

    pssm run                                   # the default: the main job (CPU preset)
    pssm run --agent dreamer --model rssm --task cartpole-swingup --env-steps 50000
    pssm run --agent sac-belief --model rssm --variant noisy --set hidden=128 --set seq_len=32
    pssm run --run-dir runs/x --resume         # continue a killed run exactly

Every flag maps to a field of :class:`rl.runner.RunConfig`; ``--set key=value`` fills
``overrides`` (driver settings: ``hidden``, ``batch_size``, ``model_batch``, ``seq_len``,
``stoch``, ``deter``, ``model_hidden``, ``model_lr``, ... as :data:`rl.drivers.OVERRIDES` lists;
``planet.<field>`` / ``dreamer.<field>`` set the agents' configs, e.g. ``--set
planet.candidates=100``; an unknown key is an error). Other subcommands (``pssm compare``)
are forwarded to :mod:`pssm.cli`.
"""

import argparse
import dataclasses
import json
import sys
import time

from .drivers import check_overrides
from .runner import RunConfig, run

DEFAULTS = RunConfig()


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("", "none") else kind(text)

    return parse


_KINDS = {"action_repeat": _optional(int), "variant": _optional(str)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``pssm run``, one per :class:`RunConfig` field."""
    for f in dataclasses.fields(RunConfig):
        if f.name == "overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(DEFAULTS, f.name)
        kind = _KINDS.get(f.name, int if isinstance(default, int) else str)
        parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="driver override, repeatable (e.g. --set hidden=128)")  # fmt: skip
    parser.add_argument("--run-dir", default=None, help="default: a new runs/<name>-<time>")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def from_args(args: argparse.Namespace) -> dict:
    overrides = []
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides.append((k, _value(v)))
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if f.name != "overrides"}  # fmt: skip
    cfg = RunConfig(**fields, overrides=tuple(overrides))
    try:
        check_overrides(cfg.overrides)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    if args.resume and not args.run_dir:
        raise SystemExit("--resume needs the --run-dir of the run to continue")
    name = "-".join(
        str(x) for x in (cfg.agent, cfg.model if cfg.agent not in ("sac", "random") else None,
                         cfg.task, cfg.variant, f"s{cfg.seed}") if x
    )  # fmt: skip
    run_dir = args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    final, rnd = summary["final_eval_return"], summary["random_return"]
    if final is not None:
        steps = summary["env_steps"]
        print(f"final evaluation return {final:.1f} vs random policy {rnd:.1f} "
              f"after {steps} environment steps; run directory: {run_dir}")  # fmt: skip
    return summary


def main(argv=None) -> None:
    """``pssm`` entry point: ``run`` here, anything else to :func:`pssm.cli.main`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":
        parser = argparse.ArgumentParser(prog="pssm run", description="collect, train, evaluate")
        add_arguments(parser)
        from_args(parser.parse_args(argv[1:]))
        return
    from pssm.cli import COMMANDS
    from pssm.cli import main as pssm_main

    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("pssm run [flags]     collect -> train model -> train agent -> evaluate "
              "(pssm run -h)")  # fmt: skip
    pssm_main(argv)
