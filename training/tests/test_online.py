"""Online training end to end: producers -> a real redis-server -> the trainer (1 and 2 DDP ranks).

Producers run as ``python -m hpctrain produce`` processes with the variables ``srun`` sets; the
trainer as ``python -m hpctrain fit --config configs/online/online.yaml`` (in this process, or as one or
two child processes). What a run took is read back from its job directory: ``result.json`` and the
per-rank logs under ``data/online/`` (``taken-rank*.jsonl``: each batch downloaded from the store;
``epochs-rank*.jsonl``: the batches each rank trained on in each epoch).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from hpctrain_testing import CONFIGS, spawn
from test_ddp import _free_port, _srun_env

from hpctrain.manifest import is_complete, load_manifest
from hpctrain.staging import StagingStore, StoreAddress

ONLINE = ["--config", str(CONFIGS / "online" / "online.yaml"), "--run.tracking=off", "--run.num_threads=1",
          "--run.export_program=false", "--trainer.enable_model_summary=false", "--data.poll_interval_s=0.05"]


def _producers(env: dict[str, str], replicas=2, ranks=2, rounds=6, interval=0.2, extra=()) -> list:
    n = replicas * ranks
    return [spawn(["produce", f"--replicas={replicas}", f"--ranks-per-replica={ranks}", f"--rounds={rounds}",
                   f"--interval-s={interval}", "--batch-size=32", "--features=16", *extra],
                  env={**env, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(n)}) for i in range(n)]


def _wait(procs, timeout=120) -> list[str]:
    return [p.communicate(timeout=timeout)[0] for p in procs]


def _rows(job: Path, kind: str) -> list[dict]:
    return [json.loads(line) for f in sorted((job / "data" / "online").glob(f"{kind}-rank*.jsonl"))
            for line in f.read_text().splitlines()]


def _taken(job: Path) -> list[tuple[str, int]]:
    return [(r["producer"], r["iteration"]) for r in _rows(job, "taken")]


def _all_batches(namespace: str, replicas=2, ranks=2, rounds=6) -> set[tuple[str, int]]:
    return {(f"{namespace}:producer_{r}:{k}", i) for r in range(replicas) for k in range(ranks) for i in range(rounds)}


def _store() -> StagingStore:
    return StagingStore.connect(StoreAddress.from_env(), wait_s=5)


@pytest.mark.slow
def test_producers_to_trainer_every_batch_once_trimmed_and_learned(hpctrain, staging_env, tmp_path):
    job = tmp_path / "job"
    producers = _producers(staging_env, rounds=8, interval=0.3, extra=["--max-buffered-batches=6"])
    rc = hpctrain("fit", *ONLINE, f"--run.job_dir={job}", "--data.producer_timeout_s=30")
    outs = _wait(producers)
    assert rc == 0 and [p.returncode for p in producers] == [0] * 4, outs
    m = load_manifest(job)
    assert is_complete(m)
    data = m["data"]
    namespace = staging_env["SLURMFLOW_STAGING_NAMESPACE"]
    taken = _taken(job)
    assert len(taken) == len(set(taken)) == 32 and set(taken) == _all_batches(namespace, rounds=8)
    assert data["batches_consumed"] == 32 and data["samples_consumed"] == 32 * 32
    assert data["all_producers_finished"] and data["dead_producers"] == []
    assert set(data["batches_per_producer"].values()) == {8}
    assert data["staleness_p50_s"] is not None and data["staleness_p95_s"] >= data["staleness_p50_s"]
    epochs = _rows(job, "epochs")
    assert len(epochs) >= 5 and len(epochs[-1]["batches"]) == 32  # the data set grew to all of them
    assert len(epochs[0]["batches"]) < 32  # ... from less, while the producers were still putting
    assert m["metrics"]["final"]["train/accuracy"] > 0.7  # chance is 0.5
    store = _store()
    assert store.stored_batches() == 0 and store.buffered() == 0  # consumed batches are trimmed


@pytest.mark.slow
def test_a_killed_producer_is_reported_and_training_ends(hpctrain, staging_env, tmp_path):
    job = tmp_path / "job"
    producers = _producers(staging_env, rounds=4, interval=0.2)
    victim = spawn(["produce", "--replicas=2", "--ranks-per-replica=2", "--replica=1", "--rank=1",
                    "--rounds=1000", "--interval-s=0.2", "--name=stuck", "--batch-size=32", "--features=16"],
                   env=staging_env)
    namespace = staging_env["SLURMFLOW_STAGING_NAMESPACE"]
    stuck = f"{namespace}:stuck_1:1"
    store = _store()
    deadline = time.monotonic() + 60
    while store.next_iteration(stuck) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # dies without a done mark
    victim.wait(10)
    put_by_victim = store.next_iteration(stuck)
    _wait(producers)
    producers_arg = json.dumps([*sorted(p for p, _ in _all_batches(namespace, rounds=1)), stuck])
    t0 = time.monotonic()
    rc = hpctrain("fit", *ONLINE, f"--run.job_dir={job}", "--data.producer_timeout_s=2",
                  f"--data.producers={producers_arg}", "--trainer.min_epochs=1")
    assert rc == 0 and time.monotonic() - t0 < 60
    data = load_manifest(job)["data"]
    assert data["dead_producers"] == [stuck] and data["all_producers_finished"]
    assert data["batches_per_producer"][stuck] == put_by_victim  # what arrived is used
    assert data["batches_consumed"] == 16 + put_by_victim


def _fit_process(job: Path, env: dict[str, str], *extra: str):
    return spawn(["fit", *ONLINE, f"--run.job_dir={job}", "--data.producer_timeout_s=30", *extra], env=env)


@pytest.mark.slow
def test_preempted_trainer_resumes_at_its_cursor(staging_env, tmp_path):
    job = tmp_path / "job"
    trainer = _fit_process(job, staging_env)
    producers = _producers(staging_env, rounds=10, interval=0.4, extra=["--max-buffered-batches=8"])
    deadline = time.monotonic() + 120
    while len(_rows(job, "taken") if (job / "data" / "online").exists() else []) < 6:
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()[0]
        time.sleep(0.05)
    trainer.send_signal(signal.SIGUSR2)
    out = trainer.communicate(timeout=120)[0]
    assert trainer.returncode == 75, out
    first = load_manifest(job)
    assert first["status"] == "preempted"
    taken_before = _taken(job)
    time.sleep(1.0)  # producers go on (and block at 8 buffered batches) while the trainer is down

    trainer = _fit_process(job, {**staging_env, "SLURM_RESTART_COUNT": "1"})
    out = trainer.communicate(timeout=180)[0]
    _wait(producers)
    assert trainer.returncode == 0, out
    m = load_manifest(job)
    assert is_complete(m) and m["training"]["resumed_from"] == "checkpoints/last.ckpt"
    namespace = staging_env["SLURMFLOW_STAGING_NAMESPACE"]
    taken = _taken(job)
    assert len(taken) > len(taken_before)
    assert len(taken) == len(set(taken)) == 40 and set(taken) == _all_batches(namespace, rounds=10)  # none twice, none lost
    assert {r["restart"] for r in _rows(job, "taken")} == {0, 1}
    assert m["data"]["batches_consumed"] == 40 and m["data"]["cursor"] == {p: 10 for p in m["data"]["producers"]}
    assert _store().stored_batches() == 0


@pytest.mark.slow
def test_a_requeued_job_restarts_its_producers_at_the_cursor(staging_env, tmp_path):
    """Requeue restarts the whole job: a new, empty store and new producers. They number their
    batches from the trainer's checkpointed cursor (``data/online/cursor.json``): nothing is
    produced twice, nothing skipped, and the store ends empty (no unconsumed re-puts below it)."""
    job = tmp_path / "job"
    trainer = _fit_process(job, staging_env)
    producers = _producers(staging_env, rounds=10, interval=0.4, extra=["--max-buffered-batches=8"])
    deadline = time.monotonic() + 120
    attempts = job / ".hpctrain" / "attempts.json"
    # past start-up (a signal before the first step saves no checkpoint: see the spool test below)
    while len(_rows(job, "taken") if (job / "data" / "online").exists() else []) < 6 or not (
            attempts.exists() and '"running"' in attempts.read_text()):
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()[0]
        time.sleep(0.05)
    trainer.send_signal(signal.SIGUSR2)
    assert trainer.wait(120) == 75, trainer.communicate()[0]
    for p in producers:  # the job ends: producers and store go with it
        p.kill()
    _wait(producers)
    cursor = json.loads((job / "data" / "online" / "cursor.json").read_text())["cursor"]
    assert sum(cursor.values()) == len(_taken(job)) >= 6
    store = _store()
    store.client.delete(*store.client.keys(f"{store.namespace}:*"))  # the requeued job's store is new

    producers = _producers({**staging_env, "HPCTRAIN_JOB_DIR": str(job)}, rounds=10, interval=0.1)
    trainer = _fit_process(job, {**staging_env, "SLURM_RESTART_COUNT": "1"})
    out = trainer.communicate(timeout=180)[0]
    logs = _wait(producers)
    assert trainer.returncode == 0, out
    taken = _taken(job)
    namespace = staging_env["SLURMFLOW_STAGING_NAMESPACE"]
    assert len(taken) == len(set(taken)) == 40 and set(taken) == _all_batches(namespace, rounds=10)
    for prefix, start in cursor.items():  # each producer put only the batches past the cursor
        log = next(text for text in logs if f"{prefix}: done" in text)
        assert f"{prefix}: batch {start} put" in log and f"{prefix}: batch {start - 1} put" not in log
    assert _store().stored_batches() == 0


@pytest.mark.slow
def test_two_ddp_ranks_split_the_batches(staging_env, tmp_path):
    job = tmp_path / "job"
    port = _free_port()
    ranks = [spawn(["fit", *ONLINE, f"--run.job_dir={job}", "--data.producer_timeout_s=30",
                    "--trainer.accelerator=cpu"], env={**staging_env, **_srun_env(r, port, {})}) for r in (0, 1)]
    # uneven producers: 3 of them, 5 rounds each, so the shares differ and ranks must pad
    producers = _producers(staging_env, replicas=1, ranks=3, rounds=5, interval=0.3)
    outs = _wait(ranks, timeout=240)
    _wait(producers)
    assert [p.returncode for p in ranks] == [0, 0], outs
    assert "Starting with 2 processes" in outs[0]
    m = load_manifest(job)
    assert is_complete(m) and m["hyperparameters"]["trainer"]["devices"] == 2
    taken = _rows(job, "taken")
    assert len(taken) == len({(r["producer"], r["iteration"]) for r in taken}) == 15
    assert {r["rank"] for r in taken} == {0, 1} and all(r["g"] % 2 == r["rank"] for r in taken)
    epochs = _rows(job, "epochs")
    by_epoch: dict[int, dict[int, dict]] = {}
    for f in sorted((job / "data" / "online").glob("epochs-rank*.jsonl")):
        rank = int(f.stem.rsplit("rank", 1)[1])
        for line in f.read_text().splitlines():
            row = json.loads(line)
            by_epoch.setdefault(row["epoch"], {})[rank] = row
    assert len(epochs) == 2 * len(by_epoch)
    for per_rank in by_epoch.values():
        a, b = per_rank[0], per_rank[1]
        assert not set(a["batches"]) & set(b["batches"])  # each batch on exactly one rank ...
        total = len(a["batches"]) + len(b["batches"])
        assert sorted(a["batches"] + b["batches"]) == list(range(total))  # ... and every one of them
        assert a["samples"] + a["padding"] == b["samples"] + b["padding"]  # same steps on both ranks
    assert max(by_epoch) >= 4 and m["data"]["batches_consumed"] == 15
    assert any(len(r[0]["batches"]) != len(r[1]["batches"]) for r in by_epoch.values())  # uneven: padded


def test_batches_taken_by_an_attempt_that_stopped_before_any_checkpoint_come_from_the_spool(staging_env,
                                                                                              tmp_path):
    """The preemption signal during start-up (after the first epoch's batches were taken and
    trimmed from the store, before the first step) stops the trainer without a checkpoint: the
    next attempt starts at cursor 0, and takes those batches from the job directory's spool."""
    import numpy as np

    from hpctrain.data.online import OnlineDataModule
    from hpctrain.staging import DatasetInfo, producer_prefix

    store = _store()
    prefix = producer_prefix(store.namespace, "producer", 0, 0)
    store.publish_info(DatasetInfo(2, [4], "float32", "int64", [prefix], 8))
    for i in range(3):
        store.put_batch(prefix, np.full((5, 4), i, np.float32), np.zeros(5, np.int64), 8)
    first = OnlineDataModule(cache_dir=str(tmp_path), poll_interval_s=0.02, producer_timeout_s=30)
    first.setup("fit")
    first._apply(first._plan(), 0)
    first._local_table(1, 0, 0)  # spooled and trimmed; then the attempt stops, no checkpoint
    assert store.stored_batches() == 0
    store.put_batch(prefix, np.full((5, 4), 3, np.float32), np.zeros(5, np.int64), 8)
    store.mark_done(prefix, 4)

    second = OnlineDataModule(cache_dir=str(tmp_path), poll_interval_s=0.02, producer_timeout_s=30)
    second.setup("fit")
    second._apply(second._plan(), 0)
    table = second._local_table(1, 0, 0)
    assert len(table) == 20 and second.exhausted and second.cursor == {prefix: 4}
    assert sorted({float(v) for v in table.tensors[0][:, 0]}) == [0.0, 1.0, 2.0, 3.0]
    assert store.stored_batches() == 0


def test_the_data_module_records_how_long_it_waited_for_producers_and_fetched(staging_env, tmp_path):
    import threading

    import numpy as np

    from hpctrain.data.online import OnlineDataModule
    from hpctrain.staging import DatasetInfo, producer_prefix

    store = _store()
    prefix = producer_prefix(store.namespace, "producer", 0, 0)

    def producer() -> None:  # late info, then a late first batch: the trainer waits for both
        time.sleep(0.3)
        store.publish_info(DatasetInfo(2, [4], "float32", "int64", [prefix], 8))
        time.sleep(0.4)
        store.put_batch(prefix, np.ones((5, 4), np.float32), np.zeros(5, np.int64), 8)
        store.mark_done(prefix, 1)

    thread = threading.Thread(target=producer)
    dm = OnlineDataModule(cache_dir=str(tmp_path), poll_interval_s=0.02, producer_timeout_s=30)
    thread.start()
    try:
        dm.setup("fit")
        waited_for_info = dm.wait_s
        dm._apply(dm._plan(), 0)
        table = dm._local_table(1, 0, 0)
    finally:
        thread.join()
    assert len(table) == 5 and dm.exhausted
    assert 0.2 < waited_for_info < dm.wait_s < 30 and dm.wait_s > 0.6
    assert dm.fetch_s > 0
    data = dm.data_identity()
    assert data["wait_s"] == round(dm.wait_s, 3) and data["fetch_s"] == round(dm.fetch_s, 3)
    dm._apply(dm._plan(), 1)  # everything is there: no more waiting
    assert dm.wait_s - data["wait_s"] < 1.0


def test_no_store_address_is_a_config_error_and_a_dead_store_fails_fast(hpctrain, tmp_path, monkeypatch):
    from hpctrain.staging import StoreUnavailable

    monkeypatch.delenv("SLURMFLOW_STAGING_ADDRESS", raising=False)
    assert hpctrain("fit", *ONLINE, f"--run.job_dir={tmp_path / 'a'}") == 2
    monkeypatch.setenv("SLURMFLOW_STAGING_ADDRESS", f"127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer within 1s"):
        hpctrain("fit", *ONLINE, f"--run.job_dir={tmp_path / 'b'}", "--data.connect_timeout_s=1")
    assert time.monotonic() - t0 < 60  # (building the Trainer on a busy machine is most of it)
    m = load_manifest(tmp_path / "b")
    assert m["status"] == "failed" and "did not answer" in m["error"]
