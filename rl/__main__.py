"""``python -m rl [flags]``: the same as ``pssm run [flags]``."""

import sys

from .cli import main

main(["run", *sys.argv[1:]])
