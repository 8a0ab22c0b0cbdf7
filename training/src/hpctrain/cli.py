"""The ``hpctrain`` command: ``fit`` (LightningCLI), ``evaluate``, ``upload``, ``make-data``,
``prepare``, ``produce``, ``store``.

``python -m hpctrain fit --config <file>`` is what the Slurm job runs (docs/CONTRACTS.md).
Heavy imports happen inside each command, so ``hpctrain --help`` and ``upload`` stay quick.
"""

from __future__ import annotations

import json
import sys

USAGE = """usage: hpctrain <command> [options]

commands:
  fit        train a task from a LightningCLI config (hpctrain fit --config cfg.yaml [--model.lr 0.01 ...]);
             --args-file F splices in the arguments listed in the JSON file F (a sweep trial's own)
  evaluate   metrics of an exported model on a held-out data spec (hpctrain evaluate --help)
  upload     replay a job's offline MLflow store into a tracking server (hpctrain upload --help)
  make-data  write the synthetic borehole surrogate table to Parquet/CSV (hpctrain make-data --help)
  prepare    a pipeline stage's data set: train + held-out tables and dataset.json (hpctrain prepare --help)
  produce    one rank of a producer ensemble putting batches into the staging store (hpctrain produce --help)
  store      the job's staging store: redis-server on this node until the job ends (hpctrain store --help)

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
        try:
            rest = expand_args_files(rest)
        except ValueError as exc:
            print(f"hpctrain fit: {exc}", file=sys.stderr)
            return 2
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
    if command == "prepare":
        from hpctrain.data.borehole import prepare_main

        return prepare_main(rest)
    if command == "produce":
        from hpctrain.produce import main as produce_main

        return produce_main(rest)
    if command == "store":
        from hpctrain.store import main as store_main

        return store_main(rest)
    print(f"hpctrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def expand_args_files(args: list[str]) -> list[str]:
    """Replace each ``--args-file F`` (or ``--args-file=F``) by the arguments F lists.

    F holds one JSON list of strings: a sweep writes each trial's own arguments there (see
    ``slurmflow.pipeline.sweep``), so the batch script carries data, never shell code. The
    arguments land where the flag stood; LightningCLI lets a later flag override an earlier one.

    :raises ValueError: F is missing, not JSON, or not a list of strings.
    """
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--args-file" or arg.startswith("--args-file="):
            path = arg.partition("=")[2] if "=" in arg else next(it, "")
            if not path:
                raise ValueError("--args-file needs a file name")
            try:
                with open(path, encoding="utf-8") as fh:
                    listed = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"cannot read the arguments in {path}: {exc}") from exc
            if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
                raise ValueError(f"{path} must hold a JSON list of strings, got {type(listed).__name__}")
            out.extend(listed)
        else:
            out.append(arg)
    return out
