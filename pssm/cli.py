"""The ``pssm`` command line: one subcommand per experiment.

    pssm compare [--sequences 1000 --length 50 --steps 2000 ... --out runs/elbo_comparison]
        the VRKN Figure-2 experiment (examples/elbo_comparison.py): smoothing vs filtering
        bound on a 4-d damped-oscillator LGSSM

Each subcommand registers its flags with ``add_arguments(parser)`` and runs with
``from_args(args)``; add one by extending :data:`COMMANDS`. The experiments live in the
repository's ``examples`` package, so the command needs a source checkout (the editable
install): when ``examples`` is not importable, the checkout containing this package is put on
``sys.path``.
"""

import argparse
import importlib
import sys
from pathlib import Path

# name -> (module, help)
COMMANDS = {
    "compare": (
        "examples.elbo_comparison",
        "VRKN Figure 2: smoothing (SSM) vs filtering (RSSM) bound on a damped-oscillator LGSSM",
    ),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.split(".")[0]:
            raise
    root = Path(__file__).resolve().parents[1]
    if not (root / module.split(".")[0]).is_dir():
        raise ModuleNotFoundError(f"{module} not found: `pssm` needs a source checkout")
    sys.path.insert(0, str(root))
    return importlib.import_module(module)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the (still flag-less) parser of each subcommand."""
    parser = argparse.ArgumentParser(prog="pssm", description="pssm experiments")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (module, help_text) in COMMANDS.items():
        commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        commands[name].set_defaults(module=module)
    return parser, commands


def main(argv=None) -> None:
    """Entry point of the ``pssm`` command; imports only the chosen subcommand's module."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser()
    if argv and argv[0] in commands:
        command = _load(COMMANDS[argv[0]][0])
        command.add_arguments(commands[argv[0]])
    args = parser.parse_args(argv)  # prints usage and exits on -h or a bad command
    command.from_args(args)


if __name__ == "__main__":
    main()
