"""Wall time of each DAG on the local stack, split into image, queue, training and orchestration.

Triggers train_model, nightly_retrain and hparam_sweep (4 trials) through the REST API, one after
the other, and splits each run's wall time using the task durations (image) and Slurm's own
accounting (queue = first start - submit, training = last end - first start). Orchestration is
the rest: task start-up, submission, deferral and resume, result collection, registration.
Prints a table and writes bench/results/dag_timings.json. Needs `make up`.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.airflow_api import AirflowAPI  # noqa: E402
from scripts.localstack.config import stack_env  # noqa: E402

RUNS = {
    "train_model": {},
    "nightly_retrain": {},
    "hparam_sweep": {"search_space": {"lr": [0.001, 0.01], "width": [16, 32]}, "max_parallel": 4},
}


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def sacct_times(env: dict[str, str], job_id: str) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
    """(first submit, first start, last end) of a job or all tasks of an array, from sacct."""
    out = subprocess.run(
        ["ssh", "-i", env["SSH_KEY"], "-p", env["SSH_PORT"], "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{env['SSH_USER']}@{env['SSH_HOST']}",
         f"sacct -n -X -P -j {job_id} -o Submit,Start,End"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()
    rows = [[dt.datetime.fromisoformat(v).astimezone() for v in line.split("|")] for line in out]
    return min(r[0] for r in rows), min(r[1] for r in rows), max(r[2] for r in rows)


def measure(api: AirflowAPI, env: dict[str, str], dag_id: str, conf: dict) -> dict:
    api.wait_for_dag(dag_id)
    conf = {**conf, "model_name": f"bench-{dag_id}-{uuid.uuid4().hex[:6]}"}
    run = api.wait_for_run(dag_id, api.trigger(dag_id, conf=conf)["dag_run_id"], timeout=1800)
    tis = {t["task_id"] if t["map_index"] < 0 else f"{t['task_id']}[{t['map_index']}]": t
           for t in api.task_instances(dag_id, run["dag_run_id"])}
    # hparam_sweep maps its train task over array jobs; this small sweep is one
    job = api.xcom(dag_id, run["dag_run_id"], "train", map_index=0 if "train[0]" in tis else -1)
    submit, start, end = sacct_times(env, str(job["job_id"]))
    wall = (_ts(run["end_date"]) - _ts(run["start_date"])).total_seconds()
    image = tis["build_image"]["duration"]
    queue = (start - submit).total_seconds()
    training = (end - start).total_seconds()
    train = tis.get("train") or tis["train[0]"]
    # the job's last end -> its train task's success: detection by the poller, the trigger event,
    # the scheduler, the resumed task's start-up and its end (sacct's End has whole seconds)
    end_to_success = (_ts(train["end_date"]) - end).total_seconds()
    return {"dag_id": dag_id, "state": run["state"], "wall_s": round(wall, 1), "image_s": round(image, 1),
            "queue_s": round(queue, 1), "training_s": round(training, 1),
            "orchestration_s": round(wall - image - queue - training, 1),
            "job_end_to_task_success_s": round(end_to_success, 1),
            "tasks_s": {k: round(v["duration"] or 0, 1) for k, v in tis.items()},
            # queued -> running: the executor's pick-up and the task process's start
            "task_startup_s": {k: round((_ts(v["start_date"]) - _ts(v["queued_when"])).total_seconds(), 2)
                               for k, v in tis.items() if v.get("queued_when") and v.get("start_date")}}


def median_of(runs: list[dict]) -> dict:
    """Per figure, the median over repeated runs of one DAG."""
    import statistics

    keys = ("wall_s", "image_s", "queue_s", "training_s", "orchestration_s", "job_end_to_task_success_s")
    out = {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}
    return {"dag_id": runs[0]["dag_id"], "state": ",".join(sorted({r["state"] for r in runs})), "runs": len(runs),
            **out, "tasks_s": {t: round(statistics.median(r["tasks_s"].get(t, 0) for r in runs), 1)
                               for t in runs[0]["tasks_s"]}}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dags", default=",".join(RUNS), help="comma-separated DAG ids (default: all three)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each DAG, one after another (medians)")
    ap.add_argument("--label", default="latest", help="key under which the figures are stored in the json")
    args = ap.parse_args()
    env = stack_env()
    api = AirflowAPI(env["AIRFLOW_URL"], env["AIRFLOW_USER"], env["AIRFLOW_PASSWORD"])
    every = {d: [measure(api, env, d, RUNS[d]) for _ in range(args.repeats)] for d in args.dags.split(",")}
    results = [median_of(runs) for runs in every.values()]
    print(f"medians of {args.repeats} run(s) each")
    print(f"{'DAG':<16}{'state':<9}{'wall':>7}{'image':>7}{'queue':>7}{'train':>7}{'orch.':>7}{'end->ok':>8}"
          "  (seconds)")
    for r in results:
        print(f"{r['dag_id']:<16}{r['state']:<9}{r['wall_s']:>7}{r['image_s']:>7}{r['queue_s']:>7}"
              f"{r['training_s']:>7}{r['orchestration_s']:>7}{r['job_end_to_task_success_s']:>8}")
        print("  task durations:", ", ".join(f"{k} {v}" for k, v in r["tasks_s"].items()))
    out = REPO / "bench" / "results" / "dag_timings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(out.read_text()) if out.exists() else {}
    stored = stored if isinstance(stored, dict) else {}
    stored[args.label] = {"medians": results, "runs": every,
                          "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    out.write_text(json.dumps(stored, indent=2) + "\n")
    print(f"written to {out} under {args.label!r}")
    return 0 if all(r["state"] == "success" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
