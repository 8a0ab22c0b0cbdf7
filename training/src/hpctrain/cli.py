"""The ``hpctrain`` command: ``fit`` (LightningCLI), ``evaluate``, ``upload``, ``make-data``.

``python -m hpctrain fit --config <file>`` is what the Slurm job runs (docs/CONTRACTS.md).
Heavy imports happen inside each command, so ``hpctrain --help`` and ``upload`` stay quick.
"""

from __future__ import annotations

import sys

USAGE = """usage: hpctrain <command> [options]

commands:
  fit        train a task from a LightningCLI config (hpctrain fit --config cfg.yaml [--model.lr 0.01 ...])
  evaluate   metrics of an exported model on a held-out data spec (hpctrain evaluate --help)
  upload     replay a job's offline MLflow store into a tracking server (hpctrain upload --help)
  make-data  write the synthetic borehole surrogate table to Parquet/CSV (hpctrain make-data --help)

exit codes: 0 ok (also: job already complete), 2 config error, 75 preempted (checkpoint saved: requeue me), 1 failure
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; return its exit code.

    :param argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "fit":
        from hpctrain.signals import install_process_latch

        install_process_latch()  # before the heavy imports below (see hpctrain.signals)
        from hpctrain.fit import run_fit

        # --smoke is shorthand for --run.smoke=true (fast dev run for pipeline tests)
        rest = ["--run.smoke=true" if a == "--smoke" else a for a in rest]
        return run_fit(rest)
    if command == "evaluate":
        from hpctrain.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "upload":
        from hpctrain.offline import main as upload_main

        return upload_main(rest)
    if command == "make-data":
        from hpctrain.data.borehole import main as make_data_main

        return make_data_main(rest)
    print(f"hpctrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
