"""``python -m hpctrain``: the command the Slurm job runs (see :mod:`hpctrain.cli`)."""

from __future__ import annotations

import sys

from hpctrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
