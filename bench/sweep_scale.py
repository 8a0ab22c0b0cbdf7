"""A large hparam_sweep end to end on the local stack (needs `make up`; about an hour for 1,000 trials
on 2 cores): `make bench-sweep` (BENCH_SWEEP_ARGS="--trials 200" for a shorter one).

Triggers one ``hparam_sweep`` run through the REST API (random search, tiny model, 1 epoch), with
the site's array cap (Variable ``slurmflow_max_array_size``) set so the sweep is split into
several array jobs, and reports from Airflow and Slurm:

- the run's wall time and each step's (image, job_spec, every train piece, register, catalog);
- registration: the ``register`` task's duration, in total and per trial;
- Slurm: array jobs, trials per state (sacct), the most trials running at once (must be at most
  ``max_parallel`` across all pieces) and the gap between pieces.

Prints the figures and writes bench/results/sweep_scale.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def seconds(ti: dict) -> float | None:
    start, end = parse_time(ti.get("start_date")), parse_time(ti.get("end_date"))
    return round((end - start).total_seconds(), 2) if start and end else None


def sacct(env: dict[str, str], job_ids: list[str]) -> list[list[str]]:
    out = subprocess.run(
        ["ssh", "-i", env["SSH_KEY"], "-p", env["SSH_PORT"], "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{env['SSH_USER']}@{env['SSH_HOST']}",
         f"sacct -n -P -X -j {','.join(job_ids)} -o JobID,State,Start,End"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def concurrency(rows: list[list[str]]) -> int:
    spans = [(dt.datetime.fromisoformat(r[2]), dt.datetime.fromisoformat(r[3])) for r in rows
             if r[2] not in ("", "Unknown", "None") and r[3] not in ("", "Unknown", "None")]
    return max((sum(s <= t < e for s, e in spans) for t, _ in spans), default=0)


def main() -> None:
    from scripts.airflow_api import AirflowAPI
    from tests.conftest import read_stack_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--max-parallel", type=int, default=8)
    ap.add_argument("--array-cap", type=int, default=400, help="Variable slurmflow_max_array_size for the run")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    args = ap.parse_args()

    env = read_stack_env()
    api = AirflowAPI(env["AIRFLOW_URL"], env["AIRFLOW_USER"], env["AIRFLOW_PASSWORD"])
    api.wait_for_dag("hparam_sweep")
    api.post("/variables", {"key": "slurmflow_max_array_size", "value": str(args.array_cap)})
    conf = {"model_name": f"bench-sweep-{uuid.uuid4().hex[:6]}", "search_strategy": "random",
            "n_trials": args.trials, "search_seed": 1, "max_epochs": 1, "max_parallel": args.max_parallel,
            "search_space": {"lr": [0.0005, 0.001, 0.002, 0.005, 0.01], "width": [4, 8], "seed": list(range(50))},
            "batch_size": 512, "cpus_per_task": 1, "mem": "1G", "time_limit": "00:20:00"}
    try:
        run = api.trigger("hparam_sweep", conf=conf)
        rid = run["dag_run_id"]
        print(f"triggered {rid}: {args.trials} trials, max_parallel {args.max_parallel}, "
              f"arrays of at most {args.array_cap}", flush=True)
        started = time.monotonic()
        while True:  # the job_spec step reads the Variable: keep it until then
            states = {ti["task_id"]: ti["state"] for ti in api.task_instances("hparam_sweep", rid)}
            if states.get("job_spec") in ("success", "failed", "upstream_failed") or \
                    time.monotonic() - started > 1800:
                break
            time.sleep(5)
    finally:
        try:
            api.delete("/variables/slurmflow_max_array_size")
        except Exception:
            pass
    final = api.wait_for_run("hparam_sweep", rid, timeout=args.timeout, poll=15)
    tis = api.task_instances("hparam_sweep", rid)
    steps: dict[str, object] = {}
    for ti in sorted(tis, key=lambda t: (t["task_id"], t["map_index"])):
        name = ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"
        steps[name] = {"state": ti["state"], "seconds": seconds(ti)}
    pieces = [api.xcom("hparam_sweep", rid, "train", map_index=ti["map_index"])
              for ti in sorted(tis, key=lambda t: t["map_index"]) if ti["task_id"] == "train"]
    rows = sacct(env, [str(p["job_id"]) for p in pieces])
    by_state: dict[str, int] = {}
    for r in rows:
        by_state[r[1]] = by_state.get(r[1], 0) + 1
    ends = [max(dt.datetime.fromisoformat(r[3]) for r in rows if r[0].startswith(f"{p['job_id']}_")) for p in pieces]
    starts = [min(dt.datetime.fromisoformat(r[2]) for r in rows if r[0].startswith(f"{p['job_id']}_")) for p in pieces]
    gaps = [round((starts[i + 1] - ends[i]).total_seconds(), 1) for i in range(len(pieces) - 1)]
    register = steps.get("register", {}).get("seconds")
    wall = (parse_time(final["end_date"]) - parse_time(final["start_date"])).total_seconds()
    sweep = api.xcom("hparam_sweep", rid, "register") if final["state"] == "success" else {}
    result = {
        "run_id": rid, "state": final["state"], "trials": args.trials, "max_parallel": args.max_parallel,
        "array_jobs": len(pieces), "array_cap": args.array_cap, "wall_seconds": round(wall, 1),
        "register_seconds": register, "register_per_trial_s": round(register / args.trials, 4) if register else None,
        "trials_by_state": by_state, "max_running_at_once": concurrency(rows), "gaps_between_pieces_s": gaps,
        "failed_trials": sweep.get("failed_trials"), "steps": steps,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
    out = REPO / "bench" / "results" / "sweep_scale.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
