"""Benchmark the Slurm layer against the real local Slurm (needs `make up`).

1. Query load: Slurm queries per poll interval while 1, 10 and 100 jobs wait (held, so they
   stay PENDING), for slurmflow's shared poller (the real SlurmJobTrigger/ClusterPoller) and
   for a naive poller that runs one ``squeue -j <id>`` per job per interval. Counted on the
   SSH side (commands sent) and on the Slurm side (``sdiag`` RPC counts of the cluster user;
   one squeue costs the controller several RPCs: partition, federation and job info).
2. Latency: job end -> trigger event, over >= 10 jobs ending at staggered times, with the
   operator's default poll settings (2 s -> 60 s backoff, reset on change). Each job prints
   its own end time as its last line; the event time is taken when the trigger yields.

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
SIZES = (1, 10, 100)
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
    ids = []
    for i in range(n):
        out = hook.run(["sbatch", "--parsable", "--hold", "-A", "research", "--output=/dev/null",
                        f"--job-name=bench-{tag}-{i}", "--wrap", "true"])
        if out.exit_code != 0:
            raise RuntimeError(out.stderr)
        ids.append(out.stdout.strip())
    return ids


async def measure_shared(ids: list[str]) -> dict:
    """Real triggers on the shared poller, fixed interval, ROUNDS rounds after warm-up."""
    from slurmflow.poller import get_poller
    from slurmflow.triggers.slurm import SlurmJobTrigger

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
    rounds = poller.round_queries[-ROUNDS:]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for gen in gens:
        await gen.aclose()
    per_round = [sum(q.values()) for q in rounds]
    slurm_per_round = [q.get("squeue", 0) + q.get("sacct", 0) + q.get("scontrol", 0) for q in rounds]
    return {"rounds": ROUNDS, "seconds": elapsed, "ssh_commands_per_round": per_round,
            "slurm_queries_per_round": slurm_per_round, "ssh_connections": poller.hook.connects}


def measure_naive(hook, ids: list[str]) -> dict:
    """One squeue per job per interval (one reused SSH connection, the naive poller's best case)."""
    started = time.monotonic()
    for _ in range(ROUNDS):
        round_start = time.monotonic()
        for job_id in ids:
            hook.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%T"])
        time.sleep(max(INTERVAL - (time.monotonic() - round_start), 0))
    return {"rounds": ROUNDS, "seconds": time.monotonic() - started,
            "slurm_queries_per_round": [len(ids)] * ROUNDS}


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
            naive["sdiag_delta_per_round"] = {k: round((v - (2 if k == "user_rpcs" else 0)) / ROUNDS, 2)
                                              for k, v in delta(after, before).items()}
            results.append({"waiting_jobs": n, "shared": shared, "naive": naive})
            print(
                f"  {n:>3} waiting jobs: shared {statistics.mean(shared['slurm_queries_per_round']):.0f} "
                f"query/interval ({shared['sdiag_delta_per_round']['user_rpcs']:.1f} controller RPCs, "
                f"{shared['ssh_connections']} SSH connection) | naive "
                f"{statistics.mean(naive['slurm_queries_per_round']):.0f} queries/interval "
                f"({naive['sdiag_delta_per_round']['user_rpcs']:.1f} controller RPCs)"
            )
    finally:
        for i in range(0, len(ids), 50):
            hook.cancel(ids[i : i + 50])
    return results


async def measure_latency(hook) -> dict:
    """Submit staggered short jobs, follow each with a default-settings trigger."""
    from slurmflow.triggers.slurm import SlurmJobTrigger

    tag = uuid.uuid4().hex[:6]
    jobs = []
    for i in range(LATENCY_JOBS):
        # Ends spread over ~25 s, so the shared poller is caught at every backoff stage.
        seconds = 3 + 2 * i
        out = hook.run(["sbatch", "--parsable", "-A", "research", f"--job-name=bench-lat-{tag}-{i}",
                        f"--output={hook.job_root}/lat-%j.out",
                        "--wrap", f"sleep {seconds}; date +%s.%N"])
        if out.exit_code != 0:
            raise RuntimeError(out.stderr)
        jobs.append(out.stdout.strip())

    async def follow(job_id: str) -> float:
        trigger = SlurmJobTrigger(job_id=job_id, log_pattern=f"{hook.job_root}/lat-%j.out")
        gen = trigger.run()
        event = await gen.__anext__()
        seen = time.time()
        await gen.aclose()
        assert event.payload["status"] == "success", event.payload
        end = float(hook.tail(f"{hook.job_root}/lat-{job_id}.out", 200).decode().split()[-1])
        return seen - end

    hook.make_dirs([hook.job_root])
    latencies = await asyncio.gather(*(follow(j) for j in jobs))
    return {
        "jobs": len(latencies),
        "median_s": round(statistics.median(latencies), 2),
        "p90_s": round(sorted(latencies)[int(0.9 * (len(latencies) - 1))], 2),
        "max_s": round(max(latencies), 2),
        "min_s": round(min(latencies), 2),
        "all_s": [round(x, 2) for x in latencies],
        "poll_settings": {"poll_interval": 2.0, "max_poll_interval": 60.0},
    }


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
    latency = asyncio.run(measure_latency(hook))
    print(f"  median {latency['median_s']} s, p90 {latency['p90_s']} s, max {latency['max_s']} s")
    out = REPO / "bench" / "results" / "slurm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"query_load": load, "latency": latency,
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
