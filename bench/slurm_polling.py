"""Benchmark the Slurm layer against the real local Slurm (needs `make up`).

1. Query load: Slurm queries per poll interval while 1, 100, 500 and 1,000 jobs wait (held, so
   they stay PENDING), for slurmflow's shared poller (the real SlurmJobTrigger/ClusterPoller) and
   for a naive poller that runs one ``squeue -j <id>`` per job per interval. Counted on the
   SSH side (commands sent) and on the Slurm side (``sdiag`` RPC counts of the cluster user;
   one squeue costs the controller several RPCs: partition, federation and job info). Also the
   memory the waiting triggers cost this process (RSS growth per waiting trigger), and how long
   one naive round takes (it cannot keep a 2 s interval once that exceeds 2 s).
2. Latency: job end -> trigger event, over >= 10 jobs ending at staggered times, with the
   operator's default poll settings (2 s -> 60 s backoff, reset on change), alone and with
   1,000 held jobs waiting beside them; the naive poller (one squeue per job, round after round,
   over the same jobs) side by side. Each job prints its own end time as its last line; the
   event time is taken when the trigger yields (the naive poller: when its squeue shows the end).

Prints the figures and writes bench/results/slurm.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(REPO))

INTERVAL = 2.0
ROUNDS = 4
SIZES = (1, 100, 500, 1000)
LATENCY_JOBS = 12


def setup_connection() -> dict[str, str]:
    from tests.conftest import read_stack_env

    env = read_stack_env()
    os.environ["AIRFLOW_CONN_SLURM_DEFAULT"] = json.dumps(
        {
            "conn_type": "ssh",
            "host": env["SSH_HOST"],
            "port": int(env["SSH_PORT"]),
            "login": env["SSH_USER"],
            "extra": {"key_file": env["SSH_KEY"], "no_host_key_check": True,
                      "job_root": f"{env['CLUSTER_JOB_ROOT']}/bench"},
        }
    )
    return env


def quiet_logs() -> None:
    import logging

    for name in ("asyncssh", "paramiko", "airflow", "slurmflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    except Exception:
        pass


def sdiag_counts(hook, user: str) -> dict[str, int]:
    """RPCs the controller served: all of the user's, and the job-info ones (any user)."""
    from scripts.chaos.observe import parse_sdiag

    return parse_sdiag(hook.run(["sdiag"]).stdout, user)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def submit_held(hook, n: int, tag: str) -> list[str]:
    """``n`` held jobs, submitted by one loop on the login node (one round trip, not n)."""
    loop = (f"for i in $(seq 0 {int(n) - 1}); do sbatch --parsable --hold -A research --output=/dev/null "
            f"--job-name=bench-{tag}-$i --wrap true || exit 1; done")
    out = hook.run(["sh", "-c", loop], timeout=600)
    if out.exit_code != 0:
        raise RuntimeError(out.stderr)
    return [line.split(";")[0] for line in out.stdout.split()]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def measure_shared(ids: list[str]) -> dict:
    """Real triggers on the shared poller, fixed interval, ROUNDS rounds after warm-up."""
    import gc

    from slurmflow.poller import get_poller
    from slurmflow.triggers.slurm import SlurmJobTrigger

    gc.collect()
    rss_before = rss_bytes()
    triggers = [SlurmJobTrigger(job_id=j, poll_interval=INTERVAL, max_poll_interval=INTERVAL,
                                stream_logs=False) for j in ids]
    gens = [t.run() for t in triggers]
    tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
    poller = None
    while poller is None or poller.rounds < 1:
        await asyncio.sleep(0.05)
        poller = get_poller("slurm_default")
    start_round = poller.rounds
    started = time.monotonic()
    while poller.rounds < start_round + ROUNDS:
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    gc.collect()
    rss_per_trigger = (rss_bytes() - rss_before) / len(ids)
    rounds = poller.round_queries[-ROUNDS:]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for gen in gens:
        await gen.aclose()
    per_round = [sum(q.values()) for q in rounds]
    slurm_per_round = [q.get("squeue", 0) + q.get("sacct", 0) + q.get("scontrol", 0) for q in rounds]
    return {"rounds": ROUNDS, "seconds": elapsed, "ssh_commands_per_round": per_round,
            "slurm_queries_per_round": slurm_per_round, "ssh_connections": poller.hook.connects,
            "rss_per_waiting_trigger_kib": round(rss_per_trigger / 1024, 1)}


def measure_naive(hook, ids: list[str]) -> dict:
    """One squeue per job per interval (one reused SSH connection, the naive poller's best case).
    From 500 jobs on, 2 rounds: one round then takes far longer than the interval."""
    rounds = ROUNDS if len(ids) < 500 else 2
    started = time.monotonic()
    durations = []
    for _ in range(rounds):
        round_start = time.monotonic()
        for job_id in ids:
            hook.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%T"])
        durations.append(time.monotonic() - round_start)
        time.sleep(max(INTERVAL - durations[-1], 0))
    return {"rounds": rounds, "seconds": time.monotonic() - started,
            "slurm_queries_per_round": [len(ids)] * rounds,
            "round_seconds_median": round(statistics.median(durations), 2)}


def query_load(hook, user: str) -> list[dict]:
    tag = uuid.uuid4().hex[:6]
    ids = submit_held(hook, max(SIZES), tag)
    results = []
    try:
        for n in SIZES:
            before = sdiag_counts(hook, user)
            shared = asyncio.run(measure_shared(ids[:n]))
            after = sdiag_counts(hook, user)
            # The two sdiag calls themselves are 2 user RPCs of overhead each; subtract them.
            shared["sdiag_delta_per_round"] = {k: round((v - (2 if k == "user_rpcs" else 0)) / ROUNDS, 2)
                                               for k, v in delta(after, before).items()}
            before = sdiag_counts(hook, user)
            naive = measure_naive(hook, ids[:n])
            after = sdiag_counts(hook, user)
            naive["sdiag_delta_per_round"] = {k: round((v - (2 if k == "user_rpcs" else 0)) / naive["rounds"], 2)
                                              for k, v in delta(after, before).items()}
            results.append({"waiting_jobs": n, "shared": shared, "naive": naive})
            print(
                f"  {n:>4} waiting jobs: shared {statistics.mean(shared['slurm_queries_per_round']):.0f} "
                f"query/interval ({shared['sdiag_delta_per_round']['user_rpcs']:.1f} controller RPCs, "
                f"{shared['ssh_connections']} SSH connection, {shared['rss_per_waiting_trigger_kib']} KiB "
                f"per trigger) | naive {statistics.mean(naive['slurm_queries_per_round']):.0f} queries/interval "
                f"({naive['sdiag_delta_per_round']['user_rpcs']:.1f} controller RPCs, a round takes "
                f"{naive['round_seconds_median']} s)", flush=True
            )
    finally:
        for i in range(0, len(ids), 200):
            hook.cancel(ids[i : i + 200])
    return results


def submit_short(hook, tag: str) -> list[str]:
    """Jobs whose ends spread over ~25 s, so a poller is caught at every backoff stage."""
    jobs = []
    for i in range(LATENCY_JOBS):
        out = hook.run(["sbatch", "--parsable", "-A", "research", f"--job-name=bench-lat-{tag}-{i}",
                        f"--output={hook.job_root}/lat-%j.out", "--wrap", f"sleep {3 + 2 * i}; date +%s.%N"])
        if out.exit_code != 0:
            raise RuntimeError(out.stderr)
        jobs.append(out.stdout.strip().split(";")[0])
    return jobs


def end_time(hook, job_id: str) -> float:
    return float(hook.tail(f"{hook.job_root}/lat-{job_id}.out", 200).decode().split()[-1])


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"jobs": len(ordered), "median_s": round(statistics.median(ordered), 2),
            "p95_s": round(ordered[round(0.95 * (len(ordered) - 1))], 2), "max_s": round(ordered[-1], 2),
            "min_s": round(ordered[0], 2), "all_s": [round(x, 2) for x in latencies]}


async def latency_shared(hook, background: list[str]) -> dict:
    """Default-settings triggers on the short jobs (and on ``background`` held jobs beside them)."""
    from slurmflow.triggers.slurm import SlurmJobTrigger

    jobs = submit_short(hook, uuid.uuid4().hex[:6])
    idle = [SlurmJobTrigger(job_id=j, stream_logs=False).run() for j in background]
    idle_tasks = [asyncio.ensure_future(g.__anext__()) for g in idle]

    async def follow(job_id: str) -> float:
        gen = SlurmJobTrigger(job_id=job_id, log_pattern=f"{hook.job_root}/lat-%j.out").run()
        event = await gen.__anext__()
        seen = time.time()
        await gen.aclose()
        assert event.payload["status"] == "success", event.payload
        return seen - end_time(hook, job_id)

    try:
        return summary(await asyncio.gather(*(follow(j) for j in jobs)))
    finally:
        for task in idle_tasks:
            task.cancel()
        await asyncio.gather(*idle_tasks, return_exceptions=True)
        for gen in idle:
            await gen.aclose()


def latency_naive(hook, background: list[str]) -> dict:
    """One ``squeue -j`` per job, job after job, round after round (2 s apart at the least)."""
    jobs = submit_short(hook, uuid.uuid4().hex[:6])
    seen: dict[str, float] = {}
    while len(seen) < len(jobs):
        round_start = time.monotonic()
        for job_id in [*jobs, *background]:
            if job_id in seen:
                continue
            state = hook.run(["squeue", "--noheader", f"--jobs={job_id}", "--states=all", "--format=%T"]).stdout
            if job_id in jobs and state.strip() in ("", "COMPLETED", "COMPLETING"):
                seen[job_id] = time.time()
        time.sleep(max(INTERVAL - (time.monotonic() - round_start), 0))
    return summary([seen[j] - end_time(hook, j) for j in jobs])


def latencies(hook) -> dict:
    out = {}
    held = submit_held(hook, max(SIZES), uuid.uuid4().hex[:6])
    try:
        for label, background in (("alone", []), (f"beside {len(held)} waiting", held)):
            out[label] = {"shared": asyncio.run(latency_shared(hook, background)),
                          "naive": latency_naive(hook, background)}
            s, n = out[label]["shared"], out[label]["naive"]
            print(f"  {label}: shared p50 {s['median_s']} s, p95 {s['p95_s']} s | naive p50 {n['median_s']} s, "
                  f"p95 {n['p95_s']} s", flush=True)
    finally:
        for i in range(0, len(held), 200):
            hook.cancel(held[i : i + 200])
    out["poll_settings"] = {"poll_interval": 2.0, "max_poll_interval": 60.0}
    return out


def main() -> int:
    env = setup_connection()
    quiet_logs()
    from slurmflow import poller
    from slurmflow.hooks.slurm import SlurmHook

    poller.COALESCE_SECONDS = 0.3
    hook = SlurmHook()
    hook.make_dirs([hook.job_root])
    print(f"Slurm query load per poll interval ({INTERVAL:.0f} s, {ROUNDS} intervals each):")
    load = query_load(hook, env["SSH_USER"])
    print(f"Job end -> trigger event latency over {LATENCY_JOBS} jobs (defaults: 2 s -> 60 s backoff):")
    latency = latencies(hook)
    out = REPO / "bench" / "results" / "slurm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"query_load": load, "latency": latency,
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
