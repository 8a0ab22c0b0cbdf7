"""Benchmark a sweep's registration against the real login node and MLflow (needs `make up`).

What ``register`` does per trial once the array has ended: copy the trial's results off the
cluster and log them onto the trial's MLflow run. Two implementations, side by side in one run:

* ``baseline``: the per-trial loop as it was before the sweep-at-scale change (``--baseline-ref``,
  default ``b544e13``): per trial an SFTP pass over the result files and ``results.register``
  (find the run, adopt it, log_batch, artifacts, terminate), one trial after another. It runs in
  a subprocess on a ``git worktree`` of that commit, so its code is exactly what shipped.
* ``ours``: :mod:`slurmflow.pipeline.sweep_results`: one tar stream per array job, a few
  searches for all runs, two requests per trial from a thread pool.

Each trial starts as the training leaves it: a ``trial-<i>/result.json`` on the cluster and a
FINISHED live run in MLflow holding the training's params (the job logged online). Both get
their own fresh trials. Each size runs ``--repeats`` times, alternating; medians are quoted.

Prints the figures and writes bench/results/sweep_registration.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXPERIMENT = "bench-sweep-registration"


def setup_connections() -> dict[str, str]:
    from tests.conftest import read_stack_env

    env = read_stack_env()
    os.environ["AIRFLOW_CONN_SLURM_DEFAULT"] = json.dumps({
        "conn_type": "ssh", "host": env["SSH_HOST"], "port": int(env["SSH_PORT"]), "login": env["SSH_USER"],
        "extra": {"key_file": env["SSH_KEY"], "no_host_key_check": True,
                  "job_root": f"{env['CLUSTER_JOB_ROOT']}/bench"}})
    os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"] = json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": 5001, "schema": "http",
        "login": env["MLFLOW_TRACKING_USERNAME"], "password": env["MLFLOW_TRACKING_PASSWORD"]})
    return env


def manifest(i: int, run_id: str) -> dict:
    """A result.json shaped like hpctrain's for a small surrogate trial (2 epochs)."""
    loss = 0.5 / (1 + i % 97)
    hp = {"model": {"lr": 0.001 * (1 + i % 10), "hidden_sizes": [32, 32, 16], "in_features": 8, "out_features": 1,
                    "warmup_steps": 10, "weight_decay": 0.0},
          "data": {"class_path": "hpctrain.data.MongoTabularDataModule",
                   "init_args": {"batch_size": 64, "val_fraction": 0.2, "seed": 0,
                                 "mongo": {"database": "campaigns", "collection": "borehole", "uri_env": "MONGO_URI",
                                           "query": {"valid": True, "day": {"$lte": "2026-12-01"}}}}},
          "trainer": {"max_epochs": 2, "deterministic": True}, "seed_everything": i}
    history = [{"epoch": e, "train/loss": loss * (2 - e), "val/loss": loss * (2.1 - e)} for e in range(2)]
    return {"schema_version": 1, "status": "completed", "seed": i, "hyperparameters": hp,
            "metrics": {"final": history[-1], "best": {"val/loss": history[-1]["val/loss"]}, "history": history},
            "monitor": {"metric": "val/loss", "mode": "min"},
            "mlflow": {"experiment": EXPERIMENT, "mode": "online", "run_id": run_id},
            "model": {"path": "model/model.pt", "format": "hpctrain.model/v1", "weights": "best"},
            "data": {"kind": "mongo", "documents": 4608}, "versions": {"torch": "2.13.0"}}


def make_trials(env: dict[str, str], n: int) -> tuple[str, list[dict]]:
    """``n`` trial directories on the cluster (one tar upload) and their live MLflow runs."""
    from mlflow.entities import Param

    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.pipeline.results import flatten

    mlflow = MlflowHook()
    exp = mlflow.experiment_id(EXPERIMENT)
    buf = io.BytesIO()
    trials = []
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for i in range(n):
            run = mlflow.client.create_run(exp, run_name=f"trial {i}")
            m = manifest(i, run.info.run_id)
            # the training logged its params live; the registration must not log them again
            mlflow.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in
                                                             flatten(m["hyperparameters"]).items()])
            mlflow.client.set_terminated(run.info.run_id, "FINISHED")
            for name, text in (("result.json", json.dumps(m, indent=2)), ("config.yaml", "seed_everything: 1\n")):
                data = text.encode()
                info = tarfile.TarInfo(f"trial-{i}/{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            trials.append({"lr": m["hyperparameters"]["model"]["lr"]})
    job_dir = f"{env['CLUSTER_JOB_ROOT']}/bench/sweep-registration/{uuid.uuid4().hex}"
    subprocess.run(["ssh", "-i", env["SSH_KEY"], "-p", env["SSH_PORT"], "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                    f"{env['SSH_USER']}@{env['SSH_HOST']}", f"mkdir -p {job_dir} && tar -xzf - -C {job_dir}"],
                   input=buf.getvalue(), check=True, timeout=300)
    return job_dir, trials


def register_ours(job_dir: str, trials: list[dict]) -> float:
    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.hooks.slurm import SlurmHook
    from slurmflow.pipeline import sweep_results as sr

    slurm, mlflow = SlurmHook(), MlflowHook()
    key = f"bench/{uuid.uuid4().hex}/train/-1/g0"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        piece = {"job_id": "1", "job_dir": job_dir, "array": {"total": len(trials)}, "paths": None}
        outcome = sr.layout([piece], trials)
        sr.collect(slurm, outcome, Path(tmp))
        sr.explain_failures(slurm, outcome)
        summary = mlflow.log_training(experiment=EXPERIMENT, run_key=f"{key}/sweep", run_name="bench sweep",
                                      params={}, metrics={}, tags={sr.SWEEP_TAG: key})
        sr.log_trials(mlflow, outcome, sr.SweepContext(key, summary, "img@sha256:" + "0" * 64, {}),
                      mlflow.experiment_id(EXPERIMENT))
        if hasattr(sr, "write_manifests"):  # since the manifests went to the summary run in one file
            mlflow.client.log_artifact(summary, str(sr.write_manifests(outcome, Path(tmp) / "manifests.jsonl")), "sweep")
    assert all(t.completed and t.run_id for t in outcome)
    return time.perf_counter() - start


def register_baseline(job_dir: str, trials: list[dict]) -> float:
    """The loop of the old ``register_sweep`` (per trial: collect, then register the run)."""
    from slurmflow.hooks.mlflow import MlflowHook
    from slurmflow.hooks.slurm import SlurmHook
    from slurmflow.pipeline.results import collect, register

    slurm, mlflow = SlurmHook(), MlflowHook()
    key = f"bench/{uuid.uuid4().hex}/train/-1/g0"
    job = {"job_id": "1", "job_dir": job_dir}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(trials)):
            local = Path(tmp) / f"trial-{i}"
            local.mkdir()
            m = collect(slurm, f"{job_dir}/trial-{i}", local)
            register(m, local, run_key=f"{key}/trial-{i}", model_name="bench", job={**job, "job_dir": f"{job_dir}/trial-{i}"},
                     image="img@sha256:" + "0" * 64, sbatch_script="#!/bin/bash\n", register_model=False, mlflow=mlflow,
                     extra_tags={"slurmflow.sweep": key, "slurmflow.trial": str(i)})
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    """One timed registration in this process (``--impl``), on trials made here; prints JSON."""
    sys.path.insert(0, str(Path(args.plugins)))
    sys.path.insert(1, str(Path(args.plugins).parent / "training" / "src"))
    env = setup_connections()
    from slurmflow.hooks.mlflow import MlflowHook

    hook = MlflowHook()
    hook.experiment_id(EXPERIMENT)
    job_dir, trials = make_trials(env, args.trials)
    seconds = (register_ours if args.impl == "ours" else register_baseline)(job_dir, trials)
    print(json.dumps({"impl": args.impl, "trials": args.trials, "seconds": seconds}))


def request_latency(n: int = 21) -> dict[str, float]:
    """One authenticated MLflow request (the server's auth check dominates a small call)."""
    sys.path.insert(0, str(REPO / "plugins"))
    setup_connections()
    from slurmflow.hooks.mlflow import MlflowHook

    client = MlflowHook().client
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.search_experiments(max_results=1)
        times.append(time.perf_counter() - t)
    return {"median_ms": round(1000 * statistics.median(times), 1), "max_ms": round(1000 * max(times), 1)}


def run_worker(impl: str, plugins: Path, trials: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", "--impl", impl, "--plugins", str(plugins),
                          "--trials", str(trials)], capture_output=True, text=True, timeout=7200,
                         env={**os.environ, "PYTHONPATH": ""})
    if out.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=("ours", "baseline"), default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--plugins", default=str(REPO / "plugins"), help=argparse.SUPPRESS)
    ap.add_argument("--trials", type=int, default=1000, help="trials of the large run (ours only)")
    ap.add_argument("--compare-trials", type=int, default=100, help="trials of the side-by-side runs")
    ap.add_argument("--repeats", type=int, default=3, help="side-by-side runs of each (alternating)")
    ap.add_argument("--baseline-ref", default="b544e13", help="the commit whose register loop is the baseline")
    ap.add_argument("--large-before", metavar="REF",
                    help="also time the large run with ours as of REF, alternating with today's (--repeats pairs)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    latency = request_latency()
    print(f"one authenticated MLflow request: median {latency['median_ms']} ms (max {latency['max_ms']} ms)")
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.baseline_ref],
                       check=True, capture_output=True)
        try:
            if args.large_before:
                subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", args.large_before], check=True)
                large_pairs = []
                for r in range(args.repeats):
                    before = run_worker("ours", tree / "plugins", args.trials)
                    now = run_worker("ours", REPO / "plugins", args.trials)
                    large_pairs.append((before, now))
                    print(f"  {args.trials} trials, pair {r + 1}: {args.large_before} {before:.2f} s, now {now:.2f} s "
                          f"({before / now:.2f}x)")
                subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", args.baseline_ref], check=True)
            pairs = []
            for r in range(args.repeats):
                base = run_worker("baseline", tree / "plugins", args.compare_trials)
                ours = run_worker("ours", REPO / "plugins", args.compare_trials)
                pairs.append((base, ours))
                print(f"  {args.compare_trials} trials, pair {r + 1}: baseline {base:.2f} s, ours {ours:.2f} s "
                      f"({base / ours:.1f}x)")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    large = run_worker("ours", REPO / "plugins", args.trials)
    n = args.compare_trials
    result = {
        "mlflow_request": latency,
        "compare": {"trials": n, "pairs": [{"baseline_s": round(b, 3), "ours_s": round(o, 3)} for b, o in pairs],
                    "baseline_per_trial_s": round(statistics.median(b for b, _ in pairs) / n, 4),
                    "ours_per_trial_s": round(statistics.median(o for _, o in pairs) / n, 4),
                    "speedup_median": round(statistics.median(b / o for b, o in pairs), 2),
                    "baseline_ref": args.baseline_ref},
        "large": {"trials": args.trials, "seconds": round(large, 2), "per_trial_s": round(large / args.trials, 4)},
        "machine": f"{os.cpu_count()} cores",
    }
    if args.large_before:
        result["large"]["pairs"] = [{"before_s": round(b, 2), "now_s": round(o, 2)} for b, o in large_pairs]
        result["large"]["before_ref"] = args.large_before
        result["large"]["speedup_median"] = round(statistics.median(b / o for b, o in large_pairs), 2)
    c = result["compare"]
    print(f"per trial, {n} trials, median of {args.repeats}: baseline {c['baseline_per_trial_s']} s, "
          f"ours {c['ours_per_trial_s']} s, {c['speedup_median']}x")
    print(f"{args.trials} trials (ours): {large:.1f} s, {result['large']['per_trial_s']} s per trial")
    out = REPO / "bench" / "results" / "sweep_registration.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
