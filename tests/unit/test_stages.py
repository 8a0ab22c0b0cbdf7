"""Stage keys, the cache layout, the cache check's quoting, and the job-side lock run for real."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from slurmflow.pipeline.stages import (
    OUTCOME_FILE,
    StageCache,
    cache_check_command,
    stage_job_lines,
    stage_key,
    stage_record,
)

CODE = "sha256-abc"
KEY = "a" * 64


def keys(prepare: dict, train: dict, evaluate: dict, code: str = CODE) -> tuple[str, str, str]:
    """The three keys of a pipeline whose outputs hash as a function of the key (deterministic jobs)."""
    p = stage_key("prepare", code, prepare, {})
    t = stage_key("train", code, train, {"prepare": "out-" + p})
    e = stage_key("evaluate", code, evaluate, {"prepare": "out-" + p, "train": "out-" + t})
    return p, t, e


def test_key_is_stable_and_canonical():
    assert stage_key("prepare", CODE, {"rows": 1, "seed": 2}, {}) == stage_key("prepare", CODE, {"seed": 2, "rows": 1}, {})
    assert len(stage_key("prepare", CODE, {}, {})) == 64


def test_a_param_change_changes_exactly_the_downstream_keys():
    base = keys({"rows": 10}, {"lr": 0.1}, {"batch": 8})
    train_changed = keys({"rows": 10}, {"lr": 0.2}, {"batch": 8})
    assert train_changed[0] == base[0] and train_changed[1] != base[1] and train_changed[2] != base[2]
    eval_changed = keys({"rows": 10}, {"lr": 0.1}, {"batch": 16})
    assert eval_changed[:2] == base[:2] and eval_changed[2] != base[2]
    prep_changed = keys({"rows": 11}, {"lr": 0.1}, {"batch": 8})
    assert all(a != b for a, b in zip(prep_changed, base, strict=True))
    # a new code version invalidates everything
    assert all(a != b for a, b in zip(keys({"rows": 10}, {"lr": 0.1}, {"batch": 8}, "other"), base, strict=True))


def test_key_needs_its_inputs():
    with pytest.raises(ValueError, match="prepare"):
        stage_key("train", CODE, {}, {})
    with pytest.raises(ValueError, match="unknown stage"):
        stage_key("deploy", CODE, {}, {})


def test_cache_layout():
    cache = StageCache("/shared/cache/")
    assert cache.entry("prepare", KEY) == f"/shared/cache/prepare/{KEY}"
    assert cache.stage_file("train", KEY) == f"/shared/cache/train/{KEY}/stage.json"
    assert cache.lock("evaluate", KEY) == f"/shared/cache/evaluate/{KEY}.lock"
    assert cache.file_mode == "660" and StageCache("/c", mode="2775").file_mode == "664"
    with pytest.raises(ValueError, match="64 hex"):
        cache.entry("prepare", "../../etc")
    with pytest.raises(ValueError, match="absolute"):
        StageCache("relative/dir")
    with pytest.raises(ValueError, match="group"):
        StageCache("/c", group="x; rm -rf /")
    with pytest.raises(ValueError, match="mode"):
        StageCache("/c", mode="u+rwx")


@pytest.mark.parametrize("value, expected", [
    (None, StageCache("/home/u/slurmflow-stage-cache")),
    ("", StageCache("/home/u/slurmflow-stage-cache")),
    ("/proj/cache", StageCache("/proj/cache")),
    ('{"path": "/proj/c", "group": "cu_0003", "mode": "2775"}', StageCache("/proj/c", "cu_0003", "2775")),
    ({"group": "cu_0003"}, StageCache("/home/u/slurmflow-stage-cache", "cu_0003")),
])
def test_cache_from_variable(value, expected):
    assert StageCache.from_setting(value, "/home/u") == expected


def test_cache_variable_unknown_key():
    with pytest.raises(ValueError, match="unknown keys"):
        StageCache.from_setting({"pth": "/x"}, "/home/u")


def test_cache_check_command_quotes_the_path(tmp_path):
    root = tmp_path / "it's a $HOME dir"
    cache = StageCache(str(root))
    command = cache_check_command(cache, "prepare", KEY)
    assert shlex.split(command)[2] == f"{root}/prepare/{KEY}/stage.json"
    missing = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stdout == ""
    entry = Path(cache.entry("prepare", KEY))
    entry.mkdir(parents=True)
    (entry / "stage.json").write_text('{"key": "k"}')
    found = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert found.returncode == 0 and json.loads(found.stdout) == {"key": "k"}


def _job(tmp_path: Path, name: str, cache: StageCache, compute: str, inputs: dict | None = None) -> tuple[Path, str]:
    job_dir = tmp_path / name
    job_dir.mkdir()
    record = stage_record("prepare", KEY, CODE, {"rows": 3, "name": 'q"uote\\'}, {}, {"run_id": name})
    return job_dir, stage_job_lines(cache, "prepare", KEY, compute, record, inputs or {})


def _run(job_dir: Path, script: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", script], env={**os.environ, "SLURMFLOW_JOB_DIR": str(job_dir)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_concurrent_jobs_compute_once_and_publish_atomically(tmp_path):
    cache = StageCache(str(tmp_path / "cache"))
    counter = tmp_path / "computations"
    # the computation appends to a counter, takes a while, writes two outputs (one in a subfolder)
    compute = (f'echo x >> {shlex.quote(str(counter))}; sleep 1; echo rows > "$SLURMFLOW_JOB_DIR/out/train.csv"; '
               'mkdir -p "$SLURMFLOW_JOB_DIR/out/sub dir"; echo h > "$SLURMFLOW_JOB_DIR/out/sub dir/holdout.csv"')
    jobs = [_job(tmp_path, f"job{i}", cache, compute) for i in range(2)]
    procs = [_run(d, s) for d, s in jobs]
    time.sleep(0.3)
    entry = Path(cache.entry("prepare", KEY))
    assert not entry.exists()  # never half-written: the entry appears whole, by one rename
    outs = [p.communicate(timeout=30)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert counter.read_text() == "x\n"  # the work was done once
    assert sorted((d / OUTCOME_FILE).read_text().strip() for d, _ in jobs) == ["cached", "computed"]
    record = json.loads((entry / "stage.json").read_text())
    assert record["key"] == KEY and record["params"]["name"] == 'q"uote\\'
    assert set(record["files"]) == {"train.csv", "sub dir/holdout.csv"}
    assert len(record["outputs_hash"]) == 64
    assert (entry / "train.csv").read_text() == "rows\n"
    assert oct((entry / "sub dir").stat().st_mode & 0o7777) == "0o2770"
    assert oct((entry / "train.csv").stat().st_mode & 0o777) == "0o660"
    assert not list(entry.parent.glob(".tmp-*"))
    # a third job of the same key (a requeue, a late run) does nothing either
    d, s = _job(tmp_path, "job3", cache, compute)
    assert _run(d, s).wait(timeout=30) == 0 and counter.read_text() == "x\n"


def test_outputs_hash_is_the_content(tmp_path):
    def publish(name: str, text: str) -> dict:
        cache = StageCache(str(tmp_path / name))
        d, s = _job(tmp_path, name, cache, f'echo {text} > "$SLURMFLOW_JOB_DIR/out/a.csv"')
        assert _run(d, s).wait(timeout=30) == 0
        return json.loads(Path(cache.stage_file("prepare", KEY)).read_text())

    one, two, other = publish("c1", "same"), publish("c2", "same"), publish("c3", "different")
    assert one["outputs_hash"] == two["outputs_hash"] != other["outputs_hash"]


def test_a_failed_computation_publishes_nothing_and_releases_the_lock(tmp_path):
    cache = StageCache(str(tmp_path / "cache"))
    d, s = _job(tmp_path, "bad", cache, "echo partial > \"$SLURMFLOW_JOB_DIR/out/x\"; false")
    proc = _run(d, s)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1 and "computation failed" in out
    assert not Path(cache.entry("prepare", KEY)).exists()
    d, s = _job(tmp_path, "good", cache, "echo ok > \"$SLURMFLOW_JOB_DIR/out/x\"")
    assert _run(d, s).wait(timeout=30) == 0
    assert Path(cache.stage_file("prepare", KEY)).is_file()


def test_inputs_are_copied_into_the_job(tmp_path):
    upstream = tmp_path / "up"
    (upstream / "d").mkdir(parents=True)
    (upstream / "d" / "f.txt").write_text("in")
    cache = StageCache(str(tmp_path / "cache"))
    d, s = _job(tmp_path, "job", cache, 'cp "$SLURMFLOW_JOB_DIR/in/prepare/d/f.txt" "$SLURMFLOW_JOB_DIR/out/copy"',
                inputs={"prepare": str(upstream)})
    assert _run(d, s).wait(timeout=30) == 0
    assert (Path(cache.entry("prepare", KEY)) / "copy").read_text() == "in"


# --- the stage jobs and the operator's "cached -> no job" -----------------------------------

PARAMS = {"rows": 64, "holdout_rows": 16, "data_seed": 0, "noise": 0.0, "lr": 0.003, "max_epochs": 1,
          "batch_size": 32, "width": 8, "seed": 42, "eval_batch_size": 64, "nodes": 1, "ntasks_per_node": 1,
          "cpus_per_task": 1, "mem": "1G", "time_limit": "00:10:00", "gpus_per_node": 0, "gpus": 0}


def test_stage_jobs_declare_params_inputs_outputs():
    from slurmflow.pipeline.jobs import Site
    from slurmflow.pipeline.stage_jobs import stage_argv, stage_job, stage_params

    assert stage_params("train", PARAMS) == {"lr": 0.003, "max_epochs": 1, "batch_size": 32, "width": 8, "seed": 42}
    assert stage_argv("prepare", PARAMS)[4:6] == ["prepare", "out"]
    assert "--data.path=in/prepare/train.parquet" in stage_argv("train", PARAMS)
    assert stage_argv("evaluate", PARAMS)[-1] == "out/metrics.json"
    site = Site(partition="debug", account="acct", runtime="docker")
    cache = StageCache("/shared/cache", group="cu_0003")
    record = stage_record("evaluate", KEY, CODE, {"eval_batch_size": 64}, {}, {})
    job = stage_job("evaluate", PARAMS, "reg/img@sha256:" + "0" * 64, site, cache, KEY, record,
                    {"prepare": "/shared/cache/prepare/" + "b" * 64, "train": "/shared/cache/train/" + "c" * 64})
    assert "flock 9" in job["command"] and "hpctrain evaluate" in job["command"]
    assert f"cp -R -- /shared/cache/train/{'c' * 64}/." in job["command"]
    assert "chgrp -R -- cu_0003" in job["command"] and job["sbatch_options"]["partition"] == "debug"
    with pytest.raises(ValueError, match="takes the outputs"):
        stage_job("evaluate", PARAMS, "img", site, cache, KEY, record, {"prepare": "/x"})


class _Result:
    def __init__(self, code: int, out: str) -> None:
        self.exit_code, self.stdout, self.stderr = code, out, ""


class _Hook:
    def __init__(self, found: str | None) -> None:
        self.found, self.commands = found, []

    def run(self, command):
        self.commands.append(command)
        return _Result(0, self.found) if self.found else _Result(1, "")


def _operator(hook):
    from slurmflow.pipeline.stage_tasks import StageJobOperator

    op = StageJobOperator(task_id="prepare", command="true", stage_spec={
        "stage": "prepare", "key": KEY, "entry": f"/c/prepare/{KEY}",
        "check": cache_check_command(StageCache("/c"), "prepare", KEY)})
    op.__dict__["hook"] = hook  # the cached_property, without SSH
    return op


def test_a_cached_stage_submits_no_job(monkeypatch):
    from slurmflow.pipeline.tasks import TrainingJobOperator

    monkeypatch.setattr(TrainingJobOperator, "execute", lambda self, context: pytest.fail("submitted a job"))
    hook = _Hook(json.dumps({"outputs_hash": "h" * 64, "created_by": {"run_id": "r1"}}))
    result = _operator(hook).execute({})
    assert result["cached"] is True and result["outputs_hash"] == "h" * 64 and result["key"] == KEY
    assert hook.commands == [f"test -f /c/prepare/{KEY}/stage.json && cat -- /c/prepare/{KEY}/stage.json"]


def test_an_uncached_stage_submits(monkeypatch):
    from slurmflow.pipeline.tasks import TrainingJobOperator

    monkeypatch.setattr(TrainingJobOperator, "execute", lambda self, context: {"job_id": "7", "state": "COMPLETED"})
    assert _operator(_Hook(None)).execute({}) == {"job_id": "7", "state": "COMPLETED"}
