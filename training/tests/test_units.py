"""Fast tests of the pieces: identity, redaction, signals, manifest, sampling, generators."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch
from torch.utils.data import TensorDataset

from hpctrain.data.identity import hash_documents, redact_uri, sha256_file
from hpctrain.data.sampling import EpochShuffleSampler, ResumableLoader
from hpctrain.environment import default_num_threads, slurm_facts
from hpctrain.job import JobDir, resolve_job_dir, write_json_atomic
from hpctrain.manifest import is_complete, load_manifest, write_manifest
from hpctrain.redact import redact
from hpctrain.signals import SignalLatch, parse_signal


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "mongodb://user:s3cret@db.example:27017/x?authSource=admin",
            "mongodb://db.example:27017/x?authSource=admin",
        ),
        ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017"),
        ("mongodb+srv://u:p%40ss@cluster0.example/db", "mongodb+srv://cluster0.example/db"),
        ("http://admin:pw@127.0.0.1:5001", "http://127.0.0.1:5001"),
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_masks_secret_keys_and_uris():
    cfg = {"mongo": {"uri": "mongodb://u:p@h/db", "password": "x"}, "lr": 0.1, "tags": ["mongodb://a:b@c"]}
    assert redact(cfg) == {
        "mongo": {"uri": "mongodb://h/db", "password": "***"},
        "lr": 0.1,
        "tags": ["mongodb://c"],
    }


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_document_hash_is_order_and_type_sensitive():
    from bson import ObjectId

    oid = ObjectId("65a000000000000000000001")
    docs = [{"_id": oid, "x": 1, "y": 2.0}, {"_id": ObjectId("65a000000000000000000002"), "x": 3, "y": 4.0}]
    digest, count = hash_documents(docs)
    assert count == 2
    assert hash_documents([{"y": 2.0, "x": 1, "_id": oid}, docs[1]])[0] == digest  # key order irrelevant
    assert hash_documents(list(reversed(docs)))[0] != digest  # document order matters
    assert hash_documents([{**docs[0], "x": "1"}, docs[1]])[0] != digest  # int vs string differ


@pytest.mark.parametrize("value", ["SIGUSR2", "USR2", "usr2", str(int(signal.SIGUSR2)), int(signal.SIGUSR2)])
def test_parse_signal(value):
    assert parse_signal(value) == signal.SIGUSR2


@pytest.mark.parametrize("value", ["SIGKILL", "NOPE"])
def test_parse_signal_rejects(value):
    with pytest.raises(ValueError):
        parse_signal(value)


def test_latch_catches_signal_instead_of_dying():
    latch = SignalLatch("SIGUSR1").install()
    try:
        assert not latch.triggered
        os.kill(os.getpid(), signal.SIGUSR1)
        assert latch.triggered
    finally:
        latch.restore()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)


def test_slurm_facts():
    env = {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "1", "HOME": "/x"}
    assert slurm_facts(env) == {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "1"}
    assert default_num_threads({"SLURM_CPUS_PER_TASK": "4"}) == 4
    assert default_num_threads({}) is None


def test_job_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCTRAIN_JOB_DIR", str(tmp_path / "from-env"))
    assert resolve_job_dir() == tmp_path / "from-env"
    assert resolve_job_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("HPCTRAIN_JOB_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_job_dir() == tmp_path


def test_manifest_atomic_write_and_completeness(tmp_path):
    job = JobDir(tmp_path).create()
    assert load_manifest(tmp_path) is None and not is_complete(None)
    full = {k: {} for k in ("metrics", "model", "data", "versions", "hyperparameters")} | {"seed": 1}
    write_manifest(job, {"status": "completed", **full})
    manifest = load_manifest(tmp_path)
    assert manifest["schema_version"] == 1 and is_complete(manifest)
    assert stat.S_IMODE(os.stat(job.result).st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert not is_complete({**manifest, "status": "preempted"})
    assert not is_complete({**manifest, "smoke": True})
    assert not is_complete({**manifest, "model": None})
    job.result.write_text('{"status": "compl')  # a torn file (from some other writer) reads as absent
    assert load_manifest(tmp_path) is None


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(target, circular)  # fails mid-write -> the old file stays
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def _batches(loader):
    return [b[0].tolist() for b in loader]


def test_resumable_loader_skips_consumed_batches():
    dataset = TensorDataset(torch.arange(20))
    reference = ResumableLoader(dataset, EpochShuffleSampler(dataset, seed=3), batch_size=3)
    reference.sampler.set_epoch(1)
    expected = _batches(reference)

    first = ResumableLoader(dataset, EpochShuffleSampler(dataset, seed=3), batch_size=3)
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it)[0].tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    resumed = ResumableLoader(dataset, EpochShuffleSampler(dataset, seed=3), batch_size=3)
    resumed.load_state_dict(state)
    assert seen + _batches(resumed) == expected
    assert _batches(resumed) == expected  # the skip applies to one pass only


def test_sampler_order_depends_on_seed_and_epoch_only():
    dataset = TensorDataset(torch.arange(50))
    torch.manual_seed(0)
    a = EpochShuffleSampler(dataset, seed=5)
    torch.manual_seed(1)  # the global RNG plays no part
    b = EpochShuffleSampler(dataset, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    shards = [list(EpochShuffleSampler(dataset, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(50))


def test_climate_generator_is_deterministic_and_labelled():
    from hpctrain.data.climate import generate, generate_sample

    x, y = generate(seed=7, num_samples=6, height=32, width=32)
    assert x.shape == (6, 4, 32, 32) and y.shape == (6, 32, 32) and y.dtype == torch.int64
    x2, y2 = generate_sample(7, 3, 32, 32)
    assert torch.equal(x[3], x2) and torch.equal(y[3], y2)
    assert not torch.equal(generate_sample(8, 3, 32, 32)[0], x2)
    assert set(torch.unique(y).tolist()) <= {0, 1, 2} and (y > 0).any()


def test_borehole_table():
    from hpctrain.data.borehole import FEATURES, borehole, make_table

    table = make_table(100, seed=0)
    assert list(table.columns) == [*FEATURES, "flow"] and len(table) == 100
    assert table.equals(make_table(100, seed=0))
    nominal = {
        k: table[k].to_numpy()[:1] * 0 + v
        for k, v in {
            "rw": 0.1,
            "r": 25050,
            "Tu": 89335,
            "Hu": 1050,
            "Tl": 89.55,
            "Hl": 760,
            "L": 1400,
            "Kw": 10950,
        }.items()
    }
    assert 70 < float(borehole(nominal)[0]) < 80  # the textbook value at the range midpoints is ~72.9


def test_console_script_and_module_entry_points(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("hpctrain")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "fit" in out.stdout and "upload" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "hpctrain", "nope"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_upload_command_without_offline_store(tmp_path, capsys):
    from hpctrain.cli import main

    assert main(["upload", "--job-dir", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "no offline MLflow store" in capsys.readouterr().err


def test_tracking_target_keeps_an_earlier_offline_run(tmp_path, monkeypatch):
    from hpctrain.tracking import TrackingTarget, choose_target, remember_run

    job = JobDir(tmp_path).create()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = choose_target(job, "auto")
    assert first.mode == "offline" and first.run_id is None and "unset" in first.reason
    remember_run(job, first, "abc123", "1")
    # a later attempt on a node that can reach a (here: file-based) server keeps the offline run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'elsewhere'}")
    again = choose_target(job, "auto")
    assert (again.mode, again.run_id) == ("offline", "abc123")
    assert choose_target(job, "online").mode == "online"  # unless the config insists
    assert choose_target(job, "off") == TrackingTarget("off", None, "tracking disabled (run.tracking=off)")
