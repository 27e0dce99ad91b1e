"""``pssm run``: the runner from the command line (and ``python -m rl``).

    pssm run                                   # the default: the main job (CPU preset)
    pssm run --agent dreamer --model rssm --task cartpole-swingup --env-steps 50000
    pssm run --agent sac-belief --model rssm --variant noisy --set hidden=128 --set seq_len=32
    pssm run --agent planet --model my_package.my_module:factory   # a model of one's own
    pssm run --run-dir runs/x --resume         # continue a killed run exactly
    pssm run --run-dir runs/x --resume --env-steps 200000   # extend a (finished) run

Every flag maps to a field of :class:`rl.runner.RunConfig`; ``--set key=value`` fills
``overrides`` (settings on top of the preset: ``hidden``, ``batch_size``, ``model_batch``,
``seq_len``, ``stoch``, ``deter``, ``model_hidden``, ``model_lr``, ... as
:data:`rl.presets.SETTINGS` lists; ``planet.<field>`` / ``dreamer.<field>`` set the agents'
configs, e.g. ``--set planet.candidates=100``; an unknown key is an error). With ``--resume``
the flags left out keep the stored run's values and the flags given must match them, except
``--env-steps``, which may grow. Other subcommands (``pssm compare``) are forwarded to
:mod:`pssm.cli`.

Every flag is checked (:func:`rl.config.check`, :func:`rl.runner.check_run_dir`) before
anything is written: a usage error prints one line naming the flag and exits with status 2;
a run that cannot be resumed (no intact checkpoint) exits with status 1, changing nothing.
"""

import argparse
import dataclasses
import json
import sys
import time

from . import envs
from .config import ConfigError, RunConfig, check, describe, resume_differences
from .drivers import AGENTS, MODELS, PRESETS
from .runner import CheckpointError, check_run_dir, run, stored_config

DEFAULTS = RunConfig()
_FIELDS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "overrides"]
_CHOICES = {"agent": AGENTS, "model": (*MODELS, "module.path:factory"), "preset": PRESETS,
            "obs": tuple(envs.OBS_MODES), "variant": ("none", *envs.VARIANTS)}  # fmt: skip


def flag(field: str) -> str:
    """The command-line flag of a :class:`RunConfig` field (or ``run_dir`` / ``resume``)."""
    return "--set" if field == "overrides" else "--" + field.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} -h lists the flags)\n")


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
    """The flags of ``pssm run``, one per :class:`RunConfig` field. A flag left out is absent
    from the parsed namespace (the default, or with ``--resume`` the stored run's value)."""
    for name in _FIELDS:
        default = getattr(DEFAULTS, name)
        kind = _KINDS.get(name, int if isinstance(default, int) else str)
        choices = f"{', '.join(_CHOICES[name])}; " if name in _CHOICES else ""
        parser.add_argument(flag(name), type=kind, default=argparse.SUPPRESS,
                            help=f"({choices}default: {default})")  # fmt: skip
    parser.add_argument("--set", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="driver override, repeatable (e.g. --set hidden=128)")  # fmt: skip
    parser.add_argument("--run-dir", default=None, help="default: a new runs/<name>-<time>")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-video", action="store_true", help="no evaluation videos")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="compile from scratch (default: JAX's persistent cache)")  # fmt: skip


def parse_overrides(items) -> tuple:
    """``("key=value", ...)`` (``--set`` flags) -> ``((key, value), ...)``, values read as JSON
    where they parse (numbers, booleans, lists), else as strings."""
    overrides = []
    for item in items:
        if "=" not in item:
            raise ConfigError("overrides", f"expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides.append((k, _value(v)))
    return tuple(overrides)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The checked configuration the flags ask for; ``ConfigError`` naming the field."""
    given = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    if hasattr(args, "set"):
        given["overrides"] = parse_overrides(args.set)
    if not args.resume:
        cfg = RunConfig(**given)
    elif not args.run_dir:
        raise ConfigError("resume", "needs the --run-dir of the run to continue")
    else:
        stored = stored_config(args.run_dir)
        cfg = dataclasses.replace(stored, **given)
        if differences := resume_differences(stored, cfg):
            raise ConfigError("resume", f"{args.run_dir} holds a run with another configuration: "
                              + describe(differences, flag))  # fmt: skip
    check(cfg)
    return cfg


def from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict:
    """Run what ``args`` ask for and print the summary; usage errors go to ``parser.error``."""
    parser = parser or _Parser(prog="pssm run")
    try:
        cfg = config_from_args(args)
        name = "-".join(
            str(x) for x in (cfg.agent, cfg.model.replace(":", ".") if cfg.agent not in
                             ("sac", "random") else None,
                             cfg.task, cfg.variant, f"s{cfg.seed}") if x
        )  # fmt: skip
        run_dir = args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_run_dir(cfg, run_dir, args.resume)
    except ConfigError as e:
        parser.error(f"argument {flag(e.field)}: {e.message}")
    try:
        summary = run(cfg, run_dir, resume=args.resume, progress=not args.no_progress,
                      video=not args.no_video, tensorboard=not args.no_tensorboard,
                      compilation_cache=not args.no_compilation_cache)  # fmt: skip
    except CheckpointError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
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
        parser = _Parser(prog="pssm run", description="collect, train, evaluate")
        add_arguments(parser)
        from_args(parser.parse_args(argv[1:]), parser)
        return
    from pssm.cli import COMMANDS
    from pssm.cli import main as pssm_main

    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("pssm run [flags]     collect -> train model -> train agent -> evaluate "
              "(pssm run -h)")  # fmt: skip
    pssm_main(argv)
