"""Online training through the staging store (issue 16): store throughput, staleness, data waits.

Starts its own ``redis-server`` (Debian's) on a free loopback port with a password (in a mode-600
config file and password file, never on a command line), and measures, side by side in one run:

1. **Store -> trainer throughput.** ``--producers`` x ``--batches`` batches of ``--batch-size``
   samples x ``--features`` float32 values (``hpctrain.produce.reference_batch``, int64 labels)
   are put into the store (untimed), then fetched the way the trainer does at the start of an
   epoch: ``OnlineDataModule.train_dataloader()`` (plan, download the rank's new batches in one
   pipelined round trip, ``StagingStore.get_batches``, spool each to the job's ``data/online``,
   trim them all in a second round trip, build the epoch's tensor table). Against: the same arrays written to one local
   Parquet file (a column per feature, and the label), read with ``pandas.read_parquet`` into
   the same tensors (what ``TabularDataModule`` does). A third figure, ``store get only``, is
   ``StagingStore.get_batch`` for every batch, one round trip each, and nothing else (no spool,
   no trim). Before the pipelined fetch (commit 2cdb3d7: a get, a trim and a reload from the spool
   per batch) the product path took 0.214 s here, Parquet 19.7x faster; after, 0.058-0.060 s, 4.3-5.4x. Variants alternate within each repeat; each
   repeat fills a fresh namespace. MB are 10^6 bytes of samples + labels.

2. **Staleness and data waits of a real online training.** Producers as ``python -m hpctrain
   produce`` processes (``SLURM_PROCID``/``SLURM_NTASKS`` as ``srun`` sets them) and ``python -m
   hpctrain fit --config training/configs/online/online.yaml`` with small overrides,
   ``--run.tracking=off``, job directory in a temporary folder. The producers start once every
   trainer rank has connected to the store (``CLIENT LIST``): started together, on this machine
   they would finish before torch is even imported, and the staleness would only measure the
   trainer's start-up. From the run's ``result.json``: ``data.staleness_p50_s``/``p95_s`` (put ->
   taken into the epoch that first trains on it), ``data.wait_s`` (rank 0 waiting on producers:
   the data set's info, then new batches at each epoch start) and ``data.fetch_s`` (rank 0
   downloading its share), set against ``training.attempt_seconds`` (the fit, "fit s" below).

3. **1 vs 2 trainer ranks**: the training of 2. with one rank, and with two DDP ranks (gloo, CPU,
   the variables ``srun -n 2`` sets, as training/tests/test_ddp.py does), alternating. Wall is
   from starting the trainer process(es) to their exit (imports included); samples/s trained is
   the real (not padding) rows all ranks trained on over all epochs, per second of fit.

Medians over ``--repeats`` (default 3). Prints a table, writes bench/results/online_staging.json.

    python bench/online_staging.py                     # ~2 min on 2 cores
    python bench/online_staging.py --batches 200 --rounds 30 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAINING_SRC = REPO / "training" / "src"
sys.path[:0] = [str(TRAINING_SRC), str(REPO / "training" / "tests")]
# the children (producers, trainers) import this checkout's hpctrain too
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRAINING_SRC), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402

from hpctrain.produce import ProducerPlace, reference_batch  # noqa: E402
from hpctrain.staging import DatasetInfo, StagingStore, StoreAddress, producer_prefix  # noqa: E402

RESULTS = REPO / "bench" / "results" / "online_staging.json"
CONFIG = REPO / "training" / "configs" / "online" / "online.yaml"


# -- the store ----------------------------------------------------------------------------------
def start_redis(root: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """A password-protected redis-server on a free loopback port; the job environment to reach it."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        sys.exit("redis-server is not installed (Debian package redis-server)")
    password = secrets.token_hex(16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = root / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(f"bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {root}\nsave \"\"\n"
                      "appendonly no\nprotected-mode yes\n")
    secret = root / "staging.password"
    secret.touch(mode=0o600)
    secret.write_text(password + "\n")
    log = (root / "redis.log").open("w")
    proc = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
    env = {"SLURMFLOW_STAGING_ADDRESS": f"127.0.0.1:{port}", "SLURMFLOW_STAGING_PASSWORD_FILE": str(secret)}
    try:
        StagingStore.connect(StoreAddress.from_env(environ=env), wait_s=20, poll_s=0.05)
    except Exception:
        stop(proc)
        raise
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- 1. store -> trainer throughput --------------------------------------------------------------
def make_batches(args: argparse.Namespace) -> list[tuple[ProducerPlace, int, np.ndarray, np.ndarray]]:
    places = [ProducerPlace(0, r, 1, args.producers) for r in range(args.producers)]
    return [(place, i, *reference_batch(place, i, args.batch_size, args.features, 2.0, 0))
            for place in places for i in range(args.batches)]


def fill(env: dict[str, str], namespace: str, batches: list, producers: int) -> StagingStore:
    """Put every batch under ``namespace`` as the producers would, and mark them done (untimed)."""
    store = StagingStore.connect(StoreAddress.from_env(environ=env), namespace, wait_s=5)
    prefixes = [producer_prefix(namespace, "producer", 0, r) for r in range(producers)]
    x0 = batches[0][2]
    store.publish_info(DatasetInfo(producers, list(x0.shape[1:]), "float32", "int64", prefixes, len(batches)))
    put = dict.fromkeys(prefixes, 0)
    for place, _, x, y in batches:
        store.put_batch(prefixes[place.rank], x, y, len(batches))
        put[prefixes[place.rank]] += 1
    for prefix, n in put.items():
        store.mark_done(prefix, n)
    return store


def fetch_product(namespace: str, cache_dir: Path) -> int:
    """What the trainer does at an epoch start: ``train_dataloader()`` over the store; rows loaded."""
    from hpctrain.data.online import OnlineDataModule

    dm = OnlineDataModule(namespace=namespace, cache_dir=str(cache_dir), poll_interval_s=0.01, connect_timeout_s=5)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(reload_dataloaders_every_n_epochs=1, world_size=1, global_rank=0, current_epoch=0)
    loader = dm.train_dataloader()
    rows = len(loader.dataset)
    dm.store.client.close()
    return rows


def fetch_get_only(store: StagingStore, batches: list) -> int:
    import torch

    xs, ys = [], []
    for place, i, _, _ in batches:
        b = store.get_batch(producer_prefix(store.namespace, "producer", 0, place.rank), i)
        xs.append(torch.from_numpy(b.samples))
        ys.append(torch.from_numpy(b.labels))
    x, y = torch.cat(xs), torch.cat(ys)
    return len(x) if len(y) == len(x) else 0


def write_parquet(path: Path, batches: list) -> list[str]:
    import pandas as pd

    x = np.concatenate([b[2] for b in batches])
    y = np.concatenate([b[3] for b in batches])
    features = [f"x{k}" for k in range(x.shape[1])]
    table = pd.DataFrame(x, columns=features)
    table["label"] = y
    table.to_parquet(path, index=False)
    return features


def read_parquet(path: Path, features: list[str]) -> int:
    import pandas as pd
    import torch

    table = pd.read_parquet(path)
    x = torch.from_numpy(table[features].to_numpy(np.float32, copy=True))
    y = torch.from_numpy(table["label"].to_numpy(np.int64, copy=True))
    return len(x) if len(y) == len(x) else 0


def throughput(env: dict[str, str], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    batches = make_batches(args)
    samples = len(batches) * args.batch_size
    payload = samples * (args.features * 4 + 8)
    parquet = root / "samples.parquet"
    features = write_parquet(parquet, batches)
    seconds: dict[str, list[float]] = {"store (product path)": [], "store get only": [], "local parquet": []}
    for rep in range(-1, args.repeats):  # repeat -1: untimed warm-up (imports, page cache)
        ns = f"bench-fetch-{rep + 1}"
        fill(env, ns, batches, args.producers)
        t0 = time.perf_counter()
        assert fetch_product(ns, root / f"spool-{rep + 1}") == samples
        t_store = time.perf_counter() - t0
        store = fill(env, ns + "-get", batches, args.producers)
        t0 = time.perf_counter()
        assert fetch_get_only(store, batches) == samples
        t_get = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert read_parquet(parquet, features) == samples
        t_parquet = time.perf_counter() - t0
        store.client.flushdb()
        store.client.close()
        if rep >= 0:
            for name, t in zip(seconds, (t_store, t_get, t_parquet), strict=True):
                seconds[name].append(t)
    out: dict[str, Any] = {"samples": samples, "batches": len(batches), "payload_mb": round(payload / 1e6, 3),
                           "parquet_bytes": parquet.stat().st_size, "variants": {}}
    for name, ts in seconds.items():
        med = statistics.median(ts)
        out["variants"][name] = {"seconds": [round(t, 4) for t in ts], "median_s": round(med, 4),
                                 "samples_per_s": round(samples / med, 1), "mb_per_s": round(payload / 1e6 / med, 2)}
    store_s = out["variants"]["store (product path)"]["median_s"]
    out["parquet_over_store"] = round(store_s / out["variants"]["local parquet"]["median_s"], 2)
    out["parquet_over_store_pairwise"] = round(statistics.median(
        a / b for a, b in zip(seconds["store (product path)"], seconds["local parquet"], strict=True)), 2)
    out["get_only_share_of_store_path"] = round(out["variants"]["store get only"]["median_s"] / store_s, 3)
    return out


# -- 2./3. a real online training ----------------------------------------------------------------
def fit_args(job: Path, args: argparse.Namespace) -> list[str]:
    return ["fit", "--config", str(CONFIG), f"--run.job_dir={job}", "--run.tracking=off", "--run.num_threads=1",
            "--run.export_program=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
            f"--trainer.min_epochs={args.min_epochs}", f"--data.batch_size={args.train_batch_size}",
            "--data.poll_interval_s=0.05", "--data.producer_timeout_s=60"]


def online_run(env: dict[str, str], root: Path, ranks: int, rep: int, args: argparse.Namespace) -> dict[str, Any]:
    import redis
    from hpctrain_testing import spawn
    from test_ddp import _free_port, _srun_env

    namespace = f"bench-online-{ranks}r-{rep}"
    job = root / f"job-{ranks}r-{rep}"
    env = {**env, "SLURMFLOW_STAGING_NAMESPACE": namespace}
    address = StoreAddress.from_env(environ=env)
    monitor = redis.Redis(host=address.host, port=address.port, password=address.password)
    before = len(monitor.client_list())
    port = _free_port()
    t0 = time.perf_counter()
    trainers = [spawn(fit_args(job, args), env={**env, **(_srun_env(r, port, {}) if ranks > 1 else {})})
                for r in range(ranks)]
    deadline = time.monotonic() + 300
    while len(monitor.client_list()) < before + ranks:  # every rank is set up and waits for the info
        if any(p.poll() is not None for p in trainers) or time.monotonic() > deadline:
            outs = [p.communicate(timeout=60)[0] for p in trainers]
            raise RuntimeError(f"a trainer did not connect to the store:\n{outs[0][-3000:]}")
        time.sleep(0.05)
    connected = time.perf_counter() - t0
    n = args.replicas * args.ranks_per_replica
    producers = [spawn(["produce", f"--replicas={args.replicas}", f"--ranks-per-replica={args.ranks_per_replica}",
                        f"--rounds={args.rounds}", f"--interval-s={args.interval_s}",
                        f"--batch-size={args.produce_batch_size}", f"--features={args.features}"],
                       env={**env, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(n)}) for i in range(n)]
    outs = [p.communicate(timeout=600)[0] for p in trainers]
    wall = time.perf_counter() - t0
    pouts = [p.communicate(timeout=60)[0] for p in producers]
    monitor.close()
    if any(p.returncode for p in trainers) or any(p.returncode for p in producers):
        raise RuntimeError(f"{ranks}-rank run {rep} failed: {[p.returncode for p in trainers]} "
                           f"{[p.returncode for p in producers]}\n{outs[0][-3000:]}\n{pouts[0][-1000:]}")
    manifest = json.loads((job / "result.json").read_text())
    data, training = manifest["data"], manifest["training"]
    fit_s = float(training["attempt_seconds"])
    trained = sum(json.loads(line)["samples"] for f in (job / "data" / "online").glob("epochs-rank*.jsonl")
                  for line in f.read_text().splitlines())
    expected = n * args.rounds
    assert data["batches_consumed"] == expected and data["all_producers_finished"], data
    return {
        "wall_s": round(wall, 3), "trainer_ready_s": round(connected, 3), "fit_s": fit_s,
        "epochs": int(training["epochs_completed"]), "steps": int(training["global_step"]),
        "samples_consumed": int(data["samples_consumed"]), "samples_trained": trained,
        "ingest_samples_per_s": round(data["samples_consumed"] / fit_s, 1),
        "trained_samples_per_s": round(trained / fit_s, 1),
        "staleness_p50_s": data["staleness_p50_s"], "staleness_p95_s": data["staleness_p95_s"],
        "wait_s": data["wait_s"], "fetch_s": data["fetch_s"],
        "wait_fraction": round(data["wait_s"] / fit_s, 4),
        "data_fraction": round((data["wait_s"] + data["fetch_s"]) / fit_s, 4),
        "train_accuracy": manifest["metrics"]["final"].get("train/accuracy"),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {"median": {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}, "runs": runs}


# -- the table -----------------------------------------------------------------------------------
def print_throughput(result: dict[str, Any]) -> None:
    tp = result["throughput"]
    print(f"\n1. store -> trainer: {tp['batches']} batches, {tp['samples']} samples, {tp['payload_mb']} MB "
          f"(median of {result['repeats']})")
    print(f"   {'variant':<22}{'median s':>10}{'samples/s':>13}{'MB/s':>9}")
    for name, v in tp["variants"].items():
        print(f"   {name:<22}{v['median_s']:>10.4f}{v['samples_per_s']:>13,.0f}{v['mb_per_s']:>9.1f}")
    print(f"   local Parquet is {tp['parquet_over_store']}x the store's product path "
          f"(pairwise {tp['parquet_over_store_pairwise']}x); get_batch alone is "
          f"{tp['get_only_share_of_store_path']:.0%} of that path")


def print_online(result: dict[str, Any]) -> None:
    on = result["online"]
    print(f"\n2./3. online training: {on['setup']} (median of {result['repeats']})")
    rows = [("wall s (start -> exit)", "wall_s", "{:.1f}"), ("start-up s (to the store)", "trainer_ready_s", "{:.1f}"),
            ("fit s", "fit_s", "{:.1f}"),
            ("epochs", "epochs", "{:.0f}"), ("samples consumed", "samples_consumed", "{:.0f}"),
            ("ingest samples/s (of fit)", "ingest_samples_per_s", "{:.0f}"),
            ("trained samples/s (of fit)", "trained_samples_per_s", "{:.0f}"),
            ("staleness p50 s", "staleness_p50_s", "{:.3f}"), ("staleness p95 s", "staleness_p95_s", "{:.3f}"),
            ("waiting for producers s", "wait_s", "{:.2f}"), ("fetching s (rank 0)", "fetch_s", "{:.3f}"),
            ("wait fraction of fit", "wait_fraction", "{:.1%}"),
            ("wait+fetch fraction of fit", "data_fraction", "{:.1%}")]
    print(f"   {'':<28}{'1 rank':>10}{'2 ranks':>10}")
    for label, key, fmt in rows:
        a, b = (on[k]["median"][key] for k in ("1", "2"))
        print(f"   {label:<28}{fmt.format(a):>10}{fmt.format(b):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = parser.add_argument_group("1. store -> trainer throughput")
    g.add_argument("--producers", type=int, default=4, help="producers putting batches (default 4)")
    g.add_argument("--batches", type=int, default=50, help="batches per producer (default 50)")
    g.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    g.add_argument("--features", type=int, default=16, help="float32 values per sample (default 16; also 2./3.)")
    g = parser.add_argument_group("2./3. online training")
    g.add_argument("--replicas", type=int, default=2, help="producer ensemble members (default 2)")
    g.add_argument("--ranks-per-replica", type=int, default=2, help="ranks per member = classes (default 2)")
    g.add_argument("--rounds", type=int, default=20, help="batches each producer puts (default 20)")
    g.add_argument("--interval-s", type=float, default=0.25, help="seconds between a producer's puts (default 0.25)")
    g.add_argument("--produce-batch-size", type=int, default=64, help="samples per put (default 64)")
    g.add_argument("--train-batch-size", type=int, default=64, help="rows per training step (default 64)")
    g.add_argument("--min-epochs", type=int, default=5, help="trainer.min_epochs (default 5)")
    g.add_argument("--skip-training", action="store_true", help="only 1. (no trainer processes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="online-staging-") as tmp:
        root = Path(tmp)
        redis_proc, env = start_redis(root)
        os.environ.update(env)  # the in-process OnlineDataModule reads the store's address from here
        try:
            tp = throughput(env, root, args)
            online: dict[str, Any] = {}
            if not args.skip_training:
                runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
                for rep in range(args.repeats):
                    for ranks in (1, 2):
                        runs[ranks].append(online_run(env, root, ranks, rep, args))
                        r = runs[ranks][-1]
                        print(f"   run {rep} with {ranks} rank(s): fit {r['fit_s']:.1f}s, wall {r['wall_s']:.1f}s, "
                              f"staleness p50 {r['staleness_p50_s']}s, wait {r['wait_fraction']:.0%}", flush=True)
                online = {str(k): summarise(v) for k, v in runs.items()}
                online["setup"] = (f"{args.replicas * args.ranks_per_replica} producers x {args.rounds} rounds x "
                                   f"{args.produce_batch_size} samples every {args.interval_s}s, "
                                   f"MLP [64], batch {args.train_batch_size}, min_epochs {args.min_epochs}")
        finally:
            stop(redis_proc)
    result = {
        "benchmark": "online_staging",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "redis": subprocess.run([shutil.which("redis-server") or "/usr/bin/redis-server", "--version"],
                                capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "throughput": tp,
        "online": online,
        "total_s": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_throughput(result)
    if online:
        print_online(result)
    print(f"\n{result['total_s']}s in all; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
