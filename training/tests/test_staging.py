"""The staging store client and the producers against a real ``redis-server`` (fixture ``redis_server``)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from hpctrain.produce import ProducerPlace, reference_batch
from hpctrain.produce import main as produce_main
from hpctrain.staging import DatasetInfo, StagingStore, StoreAddress, StoreUnavailable, producer_prefix


@pytest.fixture
def store(staging_env) -> StagingStore:
    return StagingStore.connect(StoreAddress.from_env(), wait_s=5)


def test_address_and_password_come_from_the_environment(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    addr = StoreAddress.from_env(environ={"SLURMFLOW_STAGING_ADDRESS": "node7:6390",
                                          "SLURMFLOW_STAGING_PASSWORD_FILE": str(secret)})
    assert (addr.host, addr.port, addr.password) == ("node7", 6390, "s3cret")
    assert "s3cret" not in repr(addr) and str(addr) == "node7:6390"
    env = {"SLURMFLOW_STAGING_ADDRESS": "h:1", "SLURMFLOW_STAGING_PASSWORD": "direct"}
    assert StoreAddress.from_env(environ=env).password == "direct"
    with pytest.raises(ValueError, match="host:port"):
        StoreAddress.from_env(environ={})


def test_wrong_password_and_no_store_fail_fast(redis_server):
    good = StoreAddress.from_env(environ=redis_server)
    with pytest.raises(StoreUnavailable, match="password"):
        StagingStore.connect(StoreAddress(good.host, good.port, "wrong"), wait_s=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not answer within 1s"):
        StagingStore.connect(StoreAddress("127.0.0.1", free, "x"), wait_s=1, poll_s=0.1)
    assert time.monotonic() - t0 < 10


def test_info_once_batches_round_trip_and_trim(store):
    info = DatasetInfo(2, [4], "float32", "int64", ["a", "b"], 8)
    assert store.publish_info(info) is True
    assert store.publish_info(DatasetInfo(9, [1], "float64", "int64", [], None)) is False  # once
    assert store.info() == info
    prefix = producer_prefix(store.namespace, "producer", 0, 1)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.array([1, 1, 1], dtype=np.int64)
    assert [store.put_batch(prefix, x, y, 8) for _ in range(3)] == [0, 1, 2]  # monotonic iterations
    assert store.client.exists(f"{prefix}:batch:2")
    got = store.get_batch(prefix, 1)
    assert got is not None and got.samples.dtype == np.float32 and np.array_equal(got.samples, x)
    assert np.array_equal(got.labels, y) and got.put_time <= time.time()
    assert store.buffered() == 3 and store.stored_batches() == 3
    store.mark_done(prefix, 3)
    [status] = store.status([prefix])
    assert (status.put, status.done) == (3, 3) and status.heartbeat >= 3
    assert store.trim(prefix, 0) is True and store.trim(prefix, 0) is False  # idempotent
    assert store.buffered() == 2 and store.get_batch(prefix, 0) is None
    # many at once (one round trip each way): a missing batch is None, a missing trim not counted
    batches = store.get_batches([(prefix, 0), (prefix, 1), (prefix, 2)])
    assert batches[0] is None and all(np.array_equal(b.samples, x) for b in batches[1:])
    assert store.trim_many([(prefix, 0), (prefix, 1), (prefix, 2)]) == 2 and store.trim_many([]) == 0
    assert store.buffered() == 0 and store.stored_batches() == 0


def test_start_at_moves_a_producers_numbering_forward_only(store):
    prefix = producer_prefix(store.namespace, "producer", 1, 0)
    assert store.start_at(prefix, 4) == 4
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    assert store.put_batch(prefix, x, y, 8) == 4  # numbered from the cursor
    assert store.start_at(prefix, 2) == 5  # never backwards


def test_backpressure_bound_is_exact_under_concurrent_producers(store):
    bound, per_producer = 5, 12
    prefixes = [producer_prefix(store.namespace, "producer", 0, k) for k in range(4)]
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    peak = [0]
    stop = threading.Event()

    def produce(prefix):
        for _ in range(per_producer):
            store.put_batch(prefix, x, y, bound, poll_s=0.005)

    def watch_and_consume():
        nxt = dict.fromkeys(prefixes, 0)
        while not stop.is_set() or store.buffered():
            peak[0] = max(peak[0], store.stored_batches(), store.buffered())
            for p in prefixes:
                if store.get_batch(p, nxt[p]) is not None:
                    assert store.trim(p, nxt[p])
                    nxt[p] += 1
            time.sleep(0.01)

    consumer = threading.Thread(target=watch_and_consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(p,)) for p in prefixes]
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    stop.set()
    consumer.join(60)
    assert peak[0] == bound  # reached, never exceeded
    assert [s.put for s in store.status(prefixes)] == [per_producer] * 4
    assert store.stored_batches() == 0 and store.buffered() == 0  # every batch trimmed


def test_producer_place_from_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}
    assert ProducerPlace.resolve(3, 2, environ=env) == ProducerPlace(2, 1, 3, 2)
    with pytest.raises(ValueError, match="needs 2 x 2"):
        ProducerPlace.resolve(2, 2, environ=env)
    assert ProducerPlace.resolve(2, 2, replica=1, rank=0, environ={}).global_index == 2


def test_reference_data_is_the_seeds():
    x, y = reference_batch(ProducerPlace(1, 3, 2, 4), 0, 2000, 4, 2.0, 0)
    assert set(y.tolist()) == {3} and abs(float(x.mean()) - 3.0) < 0.1 and x.dtype == np.float32


def test_produce_command_publishes_info_batches_and_done(store, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    for procid in range(4):  # what srun -n 4 starts, one after the other here
        monkeypatch.setenv("SLURM_PROCID", str(procid))
        assert produce_main(["--replicas=2", "--ranks-per-replica=2", "--rounds=3", "--interval-s=0",
                             "--batch-size=5", "--features=3"]) == 0
    info = store.info()
    assert info is not None and info.num_classes == 2 and info.sample_shape == [3]
    assert info.producers == [f"{store.namespace}:producer_{r}:{k}" for r in (0, 1) for k in (0, 1)]
    statuses = store.status(info.producers)
    assert [(s.put, s.done) for s in statuses] == [(3, 3)] * 4
    batch = store.get_batch(info.producers[3], 2)
    assert batch is not None and batch.samples.shape == (5, 3) and set(batch.labels.tolist()) == {1}


def test_produce_command_bad_arguments_and_absent_store(monkeypatch):
    monkeypatch.setenv("SLURMFLOW_STAGING_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert produce_main(["--rounds=0"]) == 2
    assert produce_main(["--replica=0", "--rank=0", "--connect-timeout-s=0.5"]) == 1
