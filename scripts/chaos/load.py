"""``python -m scripts.chaos.load`` (``make load``): many runs at once on the local stack.

Triggers ``--runs`` train_model runs in one burst (the REST API, as a script or the UI would)
plus an ``hparam_sweep`` backfill over ``--days`` logical dates (``POST /backfills``, what the
Trigger form's Backfill mode sends), then samples every ``--every`` seconds until all have ended:

- the controller's RPCs (``sdiag``): job-info queries (squeue, any user) and all RPCs of the
  cluster user, per interval and per waiting (deferred) job;
- the triggerer's CPU (% of one core, its process tree) and RSS;
- how many train tasks are deferred and how many runs are still going.

At the end: every run's state, every training key's Slurm jobs (sacct by name: duplicates, as
:func:`scripts.chaos.observe.duplicate_jobs` counts them). Writes ``bench/results/load.json`` and
the Load section of docs/RELIABILITY.md. Exit status 1 when a run failed or a job was duplicated.

The sampler asks Slurm nothing but ``sdiag`` (REQUEST_STATS_INFO, not a job-info RPC), so the
job-info counts are the product's own: the poller's squeue per interval and each submission's
exactly-once lookup.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))

import psutil  # noqa: E402

from scripts.airflow_api import AirflowAPI  # noqa: E402
from scripts.chaos import observe  # noqa: E402
from scripts.localstack.__main__ import supervisor  # noqa: E402
from slurmflow.identity import JobKey  # noqa: E402
from tests.conftest import read_stack_env  # noqa: E402

RESULTS = REPO / "bench" / "results" / "load.json"
DOC = REPO / "docs" / "RELIABILITY.md"
BEGIN = "<!-- load:generated:begin (python -m scripts.chaos.load; do not edit by hand) -->"
END = "<!-- load:generated:end -->"
TRAIN_CONF = {"max_epochs": 2}
SWEEP_CONF = {"search_space": {"lr": [0.003, 0.01]}, "max_epochs": 1}


def tree_usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, the process and its live children) and RSS bytes of a tree."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    cpu, rss = 0.0, 0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return cpu, rss


class Sampler(threading.Thread):
    """Every ``every`` seconds: sdiag counters, the triggerer's CPU and RSS, deferred tasks."""

    def __init__(self, api: AirflowAPI, user: str, every: float) -> None:
        super().__init__(daemon=True)
        self.api, self.user, self.every = api, user, every
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a slow API or controller: a gap in the series, said
                self.samples.append({"t": time.time(), "error": repr(exc)})
            self.stop.wait(self.every)

    def sample(self) -> dict[str, Any]:
        pid = supervisor().getProcessInfo("airflow-triggerer")["pid"]
        cpu, rss = tree_usage(pid)
        deferred = self.api.get("/dags/~/dagRuns/~/taskInstances?state=deferred&limit=1")["total_entries"]
        return {"t": time.time(), "triggerer_pid": pid, "triggerer_cpu_s": cpu, "triggerer_rss": rss,
                "deferred": deferred, **observe.parse_sdiag(observe.slurm("sdiag"), self.user)}


def intervals(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair of consecutive samples: RPCs and CPU % over the interval, deferred tasks and RSS
    at its end. A pair across a triggerer or controller restart (counters reset) is dropped."""
    good = [s for s in samples if "error" not in s]
    out = []
    for a, b in zip(good, good[1:], strict=False):
        span = b["t"] - a["t"]
        if span <= 0 or b["triggerer_pid"] != a["triggerer_pid"] or b["job_info_rpcs"] < a["job_info_rpcs"]:
            continue
        out.append({"span_s": round(span, 2), "deferred": b["deferred"],
                    "job_info_rpcs": b["job_info_rpcs"] - a["job_info_rpcs"],
                    "user_rpcs": b["user_rpcs"] - a["user_rpcs"] - 1,  # the sampler's own sdiag
                    "triggerer_cpu_pct": round(100 * (b["triggerer_cpu_s"] - a["triggerer_cpu_s"]) / span, 1),
                    "triggerer_rss_mb": round(b["triggerer_rss"] / 2**20, 1)})
    return out


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None}
    return {"p50": round(statistics.median(values), 2), "max": round(max(values), 2)}


def summarise(runs: list[dict[str, Any]], ivals: list[dict[str, Any]], every: float) -> dict[str, Any]:
    """The figures of one load run: outcomes, duplicates, RPCs per interval (overall and by how
    many jobs were waiting), the triggerer's CPU and RSS."""
    by_waiting: dict[str, list[float]] = {}
    for i in ivals:
        bucket = "0" if i["deferred"] == 0 else "1-2" if i["deferred"] <= 2 else "3-5" if i["deferred"] <= 5 else "6+"
        by_waiting.setdefault(bucket, []).append(i["job_info_rpcs"] * every / i["span_s"])
    return {
        "runs": len(runs), "succeeded": sum(r["state"] == "success" for r in runs),
        "failed": [r["run_id"] for r in runs if r["state"] != "success"],
        "duplicate_jobs": sum(len(r["duplicate_job_ids"]) for r in runs),
        "slurm_jobs": sum(len(r["slurm_jobs"]) for r in runs),
        "deferred": _stats([i["deferred"] for i in ivals]),
        "job_info_rpcs_per_interval": _stats([i["job_info_rpcs"] * every / i["span_s"] for i in ivals]),
        "job_info_rpcs_per_interval_by_waiting": {k: _stats(v) for k, v in sorted(by_waiting.items())},
        "user_rpcs_per_interval": _stats([i["user_rpcs"] * every / i["span_s"] for i in ivals]),
        "triggerer_cpu_pct": _stats([i["triggerer_cpu_pct"] for i in ivals]),
        "triggerer_rss_mb": _stats([i["triggerer_rss_mb"] for i in ivals]),
    }


def render(result: dict[str, Any]) -> str:
    """The Load section of docs/RELIABILITY.md, between its markers."""
    s, p = result["summary"], result["params"]
    rpc = s["job_info_rpcs_per_interval"]
    rows = "\n".join(f"| {k} | {v['p50']} | {v['max']} |" for k, v in s["job_info_rpcs_per_interval_by_waiting"].items())
    return "\n".join([
        BEGIN,
        f"Measured {result['started_at']} on the local stack (2 cores): {p['runs']} train_model runs "
        f"triggered at once plus an hparam_sweep backfill over {p['days']} date(s), sampled every "
        f"{p['every']:g} s for {result['wall_s']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| runs that succeeded | {s['succeeded']} of {s['runs']} |",
        f"| last run ended, s after the burst | {s.get('last_run_ended_s')} |",
        f"| Slurm jobs / duplicates | {s['slurm_jobs']} / {s['duplicate_jobs']} |",
        f"| deferred tasks (p50 / max) | {s['deferred']['p50']} / {s['deferred']['max']} |",
        f"| controller job-info RPCs per {p['every']:g} s (p50 / max) | {rpc['p50']} / {rpc['max']} |",
        f"| all RPCs of the cluster user per {p['every']:g} s (p50 / max) | "
        f"{s['user_rpcs_per_interval']['p50']} / {s['user_rpcs_per_interval']['max']} |",
        f"| triggerer CPU, % of one core (p50 / max) | {s['triggerer_cpu_pct']['p50']} / {s['triggerer_cpu_pct']['max']} |",
        f"| triggerer RSS, MiB (p50 / max) | {s['triggerer_rss_mb']['p50']} / {s['triggerer_rss_mb']['max']} |",
        "",
        f"Job-info RPCs per {p['every']:g} s by how many train tasks were waiting (flat means the "
        "poller's cost does not grow with the jobs it follows; submissions add one lookup each):",
        "",
        "| deferred tasks | p50 | max |",
        "|---|---|---|",
        rows,
        END,
    ])


def update_doc(doc: Path, section: str) -> None:
    text = doc.read_text() if doc.exists() else "# Reliability\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Load\n\n" + section + "\n"
    doc.write_text(text)


def backfill_days(days: int, today: dt.date | None = None) -> tuple[str, str]:
    """The first and last logical dates: ``days`` dates ending two days ago, inside the campaign
    data ``make up`` seeds (its last 8 days)."""
    today = today or dt.date.today()
    last = today - dt.timedelta(days=2)
    return (last - dt.timedelta(days=days - 1)).isoformat(), last.isoformat()


def run_records(api: AirflowAPI, runs: list[tuple[str, str]], since: float) -> list[dict[str, Any]]:
    """Each run's state and its training key's Slurm jobs (one sacct for all)."""
    lines = observe.slurm("sacct", "-a", "-n", "-X", "-P", "-S",
                          time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60)), "-o",
                          "JobID,JobName,State,Submit,End").splitlines()
    out = []
    for dag_id, run_id in runs:
        # hparam_sweep's train task maps over its array jobs: the load's small sweeps are one piece
        digest = JobKey(dag_id, run_id, "train", 0 if dag_id == "hparam_sweep" else -1).digest
        jobs = observe.key_jobs(lines, digest)
        run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        out.append({"dag_id": dag_id, "run_id": run_id, "state": run["state"], "end_date": run.get("end_date"),
                    "training_key": digest, "slurm_jobs": sorted(jobs),
                    "duplicate_job_ids": observe.duplicate_jobs(jobs)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m scripts.chaos.load", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="train_model runs triggered at once (default 50)")
    ap.add_argument("--days", type=int, default=5, help="logical dates of the hparam_sweep backfill (default 5; 0: none)")
    ap.add_argument("--every", type=float, default=10.0, help="sampling interval, s (default 10)")
    ap.add_argument("--timeout", type=float, default=7200, help="give up on runs not ended by then (s, default 7200)")
    ap.add_argument("--smoke", action="store_true", help="4 runs and a 1-date backfill")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--recheck", action="store_true",
                    help="only look again at the runs of the results file (those that had not ended)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.days = 4, 1
    env = read_stack_env()
    api = AirflowAPI(env["AIRFLOW_URL"], env["AIRFLOW_USER"], env["AIRFLOW_PASSWORD"])
    if args.recheck:
        return recheck(api, args.results, args.doc)
    for dag_id in ("train_model", "hparam_sweep"):
        api.wait_for_dag(dag_id)
    tag = uuid.uuid4().hex[:6]
    sampler = Sampler(api, env["SSH_USER"], args.every)
    sampler.start()
    time.sleep(args.every * 2)  # a baseline before the burst
    started, t0 = dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), time.time()
    runs = [("train_model", api.trigger("train_model", conf={**TRAIN_CONF, "model_name": f"load-{tag}"})["dag_run_id"])
            for _ in range(args.runs)]
    first = last = None
    backfilled = []
    if args.days:
        first, last = backfill_days(args.days)
        sweep_conf = {**SWEEP_CONF, "model_name": f"load-sweep-{tag}"}
        api.post("/backfills", {"dag_id": "hparam_sweep", "from_date": f"{first}T00:00:00Z",
                                "to_date": f"{last}T00:00:00Z", "dag_run_conf": sweep_conf,
                                "reprocess_behavior": "completed", "max_active_runs": 1})
        backfilled = [r for r in api.get("/dags/hparam_sweep/dagRuns?run_type=backfill&limit=100")["dag_runs"]
                      if r["conf"] == sweep_conf]
    runs += [("hparam_sweep", r["dag_run_id"]) for r in backfilled]
    print(f"{args.runs} train_model runs and {len(backfilled)} backfilled sweeps triggered (tag {tag})", flush=True)
    deadline = t0 + args.timeout
    pending = set(runs)
    try:
        while pending and time.time() < deadline:
            time.sleep(10)
            for dag_id, run_id in list(pending):
                run = observe.answer(api.get, f"/dags/{dag_id}/dagRuns/{run_id}")
                if run and run["state"] in ("success", "failed"):
                    pending.discard((dag_id, run_id))
            print(f"  {time.time() - t0:5.0f} s: {len(pending)} run(s) going", flush=True)
    except KeyboardInterrupt:  # stopped by hand: what ended so far is measured, the rest timed out
        print("interrupted: the runs still going are recorded as timed out", flush=True)
    wall = time.time() - t0
    time.sleep(args.every * 2)  # and a tail after
    sampler.stop.set()
    sampler.join()
    records = run_records(api, runs, t0)
    ivals = intervals(sampler.samples)
    result = {"started_at": started, "wall_s": round(wall, 1), "tag": tag,
              "params": {"runs": args.runs, "days": args.days, "every": args.every, "backfill": [first, last]},
              "summary": summarise(records, ivals, args.every), "timed_out": sorted(r for _, r in pending),
              "runs": records, "intervals": ivals}
    return write(result, args.results, args.doc)


def write(result: dict[str, Any], path: Path, doc: Path) -> dict[str, Any]:
    """Save the results, render the doc's section, print the summary."""
    ended = [dt.datetime.fromisoformat(r["end_date"]).timestamp() for r in result["runs"] if r.get("end_date")]
    start = dt.datetime.fromisoformat(result["started_at"]).timestamp()
    result["summary"]["last_run_ended_s"] = round(max(ended) - start, 1) if ended else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    update_doc(doc, render(result))
    print(json.dumps(result["summary"], indent=2))
    print(f"results in {path}, table in {doc}")
    return result


def recheck(api: AirflowAPI, path: Path, doc: Path) -> dict[str, Any]:
    """The runs of an earlier load run looked at again, for those still going when it stopped
    waiting: states and Slurm jobs now; the sampled intervals stay those of the run."""
    result = json.loads(path.read_text())
    started = dt.datetime.fromisoformat(result["started_at"]).timestamp()
    result["runs"] = run_records(api, [(r["dag_id"], r["run_id"]) for r in result["runs"]], started)
    result["timed_out"] = sorted(r["run_id"] for r in result["runs"] if r["state"] not in ("success", "failed"))
    result["summary"] = summarise(result["runs"], result["intervals"], result["params"]["every"])
    result["rechecked_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return write(result, path, doc)


def held(result: dict[str, Any]) -> bool:
    """Whether the load run kept its promises: every run triggered succeeded, no duplicate job."""
    s = result["summary"]
    p = result["params"]
    return (s["succeeded"] == s["runs"] == p["runs"] + p["days"] and not s["duplicate_jobs"]
            and not result["timed_out"])


if __name__ == "__main__":
    sys.exit(0 if held(main()) else 1)
