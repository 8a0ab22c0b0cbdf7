"""``python -m scripts.chaos`` (``make chaos``): fault injection on real ``train_model`` runs.

Examples::

    make chaos                                   # every (fault, phase), 10 trials each
    make chaos CHAOS_ARGS=--smoke                # one trial of each, orphans checked after 60 s
    make chaos CHAOS_ARGS="--faults kill-triggerer,stop-sshd --trials 3 --append"
    python -m scripts.chaos --list               # the fault and phase tables
    python -m scripts.chaos --render             # docs/RELIABILITY.md from the results only

Trials run one after the other (a killed scheduler takes every task of the machine with it),
each on a fresh run, on a settled stack: every program healthy by ``make up``'s own checks.
Results are saved after every trial; orphan checks are due ``--orphan-wait`` seconds after a
run ended and are done between later trials, then at the end. Exit status 1 when any trial
broke a promise (a failed or lost run, a duplicate job, an orphan, a duplicated line, a secret).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))  # slurmflow.identity: the one place job names come from

from scripts.airflow_api import AirflowAPI  # noqa: E402
from scripts.chaos import observe, report  # noqa: E402
from scripts.chaos.table import FAULTS, PHASES, fewest_first, plan, select_faults  # noqa: E402
from scripts.chaos.trial import Trial, check_orphans  # noqa: E402
from tests.conftest import read_stack_env  # noqa: E402

RESULTS = REPO / "bench" / "results" / "chaos.json"
DOC = REPO / "docs" / "RELIABILITY.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--faults", default="", help=f"comma-separated subset of: {', '.join(FAULTS)}")
    ap.add_argument("--phases", default="", help=f"only these phases: {', '.join(PHASES)}")
    ap.add_argument("--trials", type=int, default=10, help="trials per (fault, phase) (default 10)")
    ap.add_argument("--smoke", action="store_true", help="one trial of each; orphan wait 60 s unless given")
    ap.add_argument("--orphan-wait", type=float, default=None,
                    help="seconds after a run ended at which its jobs must be gone (default 300)")
    ap.add_argument("--run-timeout", type=float, default=900, help="a run not ended by then is lost (s)")
    ap.add_argument("--until", default=None, help="launch no trial after this UTC time (HH:MM)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random timings (default: time)")
    ap.add_argument("--append", action="store_true", help="add to the trials already in the results file")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--render", action="store_true", help="only render the doc from the results file")
    ap.add_argument("--list", action="store_true", help="print the fault and phase tables")
    args = ap.parse_args(argv)
    if args.smoke:
        args.trials = 1
        args.orphan_wait = 60.0 if args.orphan_wait is None else args.orphan_wait
    args.orphan_wait = 300.0 if args.orphan_wait is None else args.orphan_wait
    return args


def _deadline(until: str | None) -> float | None:
    if not until:
        return None
    hour, minute = (int(x) for x in until.split(":"))
    now = dt.datetime.now(dt.UTC)
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at.timestamp() if at > now else (at + dt.timedelta(days=1)).timestamp()


def broken(record: dict) -> list[str]:
    """The promises a trial broke (empty when it kept them all)."""
    found = []
    if record.get("outcome") != "success":
        found.append(f"run {record.get('outcome')}")
    if record.get("duplicates"):
        found.append(f"{record['duplicates']} duplicate job(s)")
    if record.get("duplicate_registrations"):
        found.append(f"{record['duplicate_registrations']} duplicate registration(s)")
    if record.get("orphans"):
        found.append(f"{len(record['orphans'])} orphan(s)")
    if (record.get("lines") or {}).get("duplicated"):
        found.append(f"{record['lines']['duplicated']} duplicated line(s)")
    if (record.get("lines") or {}).get("missing"):
        found.append(f"{record['lines']['missing']} missing line(s)")
    if record.get("secrets_found"):
        found.append("secret(s) in " + ", ".join(sorted({s["where"] for s in record["secrets_found"]})))
    return found


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results["updated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def render(results: dict, doc: Path) -> None:
    text = doc.read_text() if doc.exists() else "# Reliability\n"
    doc.write_text(report.update_doc(text, report.render_generated(results)))
    print(report.render_table(report.summarise(results.get("trials", []))))
    print(f"table written to {doc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for f in FAULTS.values():
            print(f"{f.name:<20} {f.kind:<10} {f.target or '(the task)':<22} at {', '.join(f.phases)}")
        for p in PHASES.values():
            print(f"phase {p.name:<10} {p.task_id} {'/'.join(p.states)}, +{p.delay[0]:g}-{p.delay[1]:g} s")
        return 0
    results = json.loads(args.results.read_text()) if (args.append or args.render) and args.results.exists() \
        else {"trials": []}
    if args.render:
        render(results, args.doc)
        return 0
    try:
        specs = plan(select_faults(args.faults.split(",")), args.trials, [p for p in args.phases.split(",") if p])
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.append:  # rounds that carry on where earlier runs left off: the least-covered pairs first
        specs = fewest_first(specs, results.get("trials", []))
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    env = read_stack_env()
    api = AirflowAPI(env["AIRFLOW_URL"], env["AIRFLOW_USER"], env["AIRFLOW_PASSWORD"])
    for dag in sorted({s.phase.dag for s in specs}):
        api.wait_for_dag(dag)
    secrets = observe.secret_values(env)
    results.setdefault("runs", []).append({"started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                           "argv": sys.argv[1:] if argv is None else argv, "seed": seed,
                                           "orphan_wait_s": args.orphan_wait, "run_timeout_s": args.run_timeout})
    trials: list[dict] = results["trials"]
    before = len(trials)
    deadline = _deadline(args.until)
    print(f"{len(specs)} trials (seed {seed}); results in {args.results}")
    try:
        for n, spec in enumerate(specs, 1):
            if deadline and time.time() > deadline:
                print(f"--until {args.until} reached: no more trials")
                break
            unhealthy = observe.settle()
            if unhealthy:
                print(f"stack not healthy ({', '.join(unhealthy)}): stopping", file=sys.stderr)
                break
            for t in trials:
                check_orphans(t, args.orphan_wait)
            trial = Trial(api, spec, rng, secrets, run_timeout=args.run_timeout)
            try:
                record = trial.run()
            except Exception as exc:  # a harness bug or a stack that broke: keep going, say so
                record = {**trial.record, "outcome": "harness-error", "error": traceback.format_exc(limit=5)}
                print(f"harness error in {spec.fault.name} @ {spec.phase.name}: {exc!r}", file=sys.stderr)
            trials.append(record)
            save(args.results, results)
            problems = broken(record)
            print(f"[{n}/{len(specs)}] {spec.fault.name} @ {spec.phase.name}: {record['outcome']} in "
                  f"{record.get('run_s')} s, landed in {record.get('phase_at_injection')}, recovery "
                  f"{record.get('recovery_s')} s, jobs {[j['job_id'] for j in record.get('slurm_jobs') or []]}"
                  + (f"  BROKEN: {'; '.join(problems)}" if problems else ""), flush=True)
    except KeyboardInterrupt:
        print("interrupted: saving what was measured", file=sys.stderr)
    finally:
        waiting = [t for t in trials if not check_orphans(t, args.orphan_wait)]
        if waiting:
            due = max(t["ended_at_epoch"] for t in waiting) + args.orphan_wait
            print(f"orphan checks of {len(waiting)} run(s) due in {max(0, due - time.time()):.0f} s")
            try:
                time.sleep(max(0.0, due - time.time()) + 1)
                for t in trials:
                    check_orphans(t, args.orphan_wait)
            except KeyboardInterrupt:
                print("orphan checks left unchecked", file=sys.stderr)
        save(args.results, results)
        render(results, args.doc)
    bad = [(t["fault"], t["phase"], t["run_id"], broken(t)) for t in trials[before:] if broken(t)]
    for fault, phase, run_id, problems in bad:
        print(f"BROKEN {fault} @ {phase} ({run_id}): {'; '.join(problems)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
