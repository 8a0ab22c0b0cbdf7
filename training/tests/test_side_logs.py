"""TensorBoard event files, MLPerf HPC ``:::MLLOG`` lines and the quality target of a CPU fit."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hpctrain_testing import DEEPCAM_TINY, SURROGATE_TINY

from hpctrain.manifest import is_complete, load_manifest
from hpctrain.mlperf import RULESET

#: the one rule of the MLPerf HPC DeepCam ruleset a test-sized run cannot meet: the benchmark's
#: quality (IoU >= 0.82 at least once); everything else must pass
CONVERGENCE_RULE = "Failed checks for eval_accuracy : v['value'] >= 0.82 and v['value'] <= 1."


def scalar_tags(folder: Path) -> set[str]:
    """Scalar tags in the TensorBoard event files of ``folder`` (TFRecord framing: length,
    its CRC, the ``Event`` protobuf, its CRC), read with tensorboardX's protobuf classes."""
    from tensorboardX.proto import event_pb2

    tags: set[str] = set()
    for path in folder.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            pos += 12 + length + 4
    return tags


def mllog_lines(path: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines() if ":::MLLOG" in line]


def compliance(path: Path, tmp_path: Path) -> tuple[int, list[str]]:
    """The package's own checker (``--usage hpc``): exit code and its WARNING/ERROR lines."""
    report = tmp_path / "compliance.log"
    proc = subprocess.run(
        [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc", "--ruleset", RULESET,
         "--log_output", str(report), str(path)],
        capture_output=True, text=True, timeout=120,
    )
    text = report.read_text()  # the same lines also go to stdout
    assert "hpc_3.0.0/open_deepcam.yaml" in text, text  # division and benchmark were recognised
    return proc.returncode, [line for line in text.splitlines() if line.startswith(("WARNING", "ERROR"))]


#: a DeepCam-like run small enough for a test that still reaches MLPerf DeepCam's quality
#: target (IoU 0.82) on CPU: about epoch 5, 2-3 s
DEEPCAM_CONVERGING = [*DEEPCAM_TINY, "--data.num_samples=160", "--data.batch_size=8", "--model.width=8",
                      "--model.lr=0.005", "--run.export_program=false", "--trainer.max_epochs=15"]


@pytest.mark.slow
def test_deepcam_to_target_writes_tensorboard_and_an_mlperf_log_that_passes_the_checker(hpctrain, tmp_path, capsys):
    job = tmp_path / "deepcam"
    assert hpctrain("fit", *DEEPCAM_CONVERGING, "--run.target=0.82", f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert is_complete(m) and m["tensorboard"] == "tensorboard" and m["mlperf_log"] == "mlperf.log"

    # stopped at the first validation that reached the target, and timed it
    history = m["metrics"]["history"]
    assert history[-1]["val/iou"] >= 0.82 and all(r["val/iou"] < 0.82 for r in history[:-1])
    assert m["training"]["epochs_completed"] == len(history) < 15
    assert m["target"] == {"metric": "val/iou", "mode": "max", "value": 0.82, "epoch": history[-1]["epoch"]}
    assert m["target_reached"] is True and 0 < m["time_to_target_s"] < m["training"]["attempt_seconds"]

    # TensorBoard next to MLflow (the offline store here), not instead of it
    assert m["mlflow"]["mode"] == "offline" and (job / "mlruns-offline").is_dir()
    assert {"train/loss", "train/loss_epoch", "val/loss", "val/iou"} <= scalar_tags(job / "tensorboard")

    # MLLOG lines: in the file and on stdout (the Slurm job log)
    lines = mllog_lines(job / "mlperf.log")
    assert ":::MLLOG" in capsys.readouterr().out
    keys = [line["key"] for line in lines]
    for key in ("init_start", "init_stop", "run_start", "run_stop", "submission_benchmark", "cache_clear"):
        assert keys.count(key) == 1, key
    assert keys.index("init_stop") < keys.index("run_start") < keys.index("epoch_start")
    by_key = {line["key"]: line for line in lines}
    assert by_key["submission_benchmark"]["value"] == "deepcam" and by_key["submission_division"]["value"] == "open"
    assert (by_key["train_samples"]["value"], by_key["eval_samples"]["value"]) == (
        m["data"]["train_samples"], m["data"]["val_samples"])
    epochs = list(range(1, len(history) + 1))  # MLPerf counts epochs from 1
    assert [x["metadata"]["epoch_num"] for x in lines if x["key"] == "epoch_stop"] == epochs
    accuracy = [x for x in lines if x["key"] == "eval_accuracy"]
    assert [x["metadata"]["epoch_num"] for x in accuracy] == epochs
    assert [x["value"] for x in accuracy] == pytest.approx([r["val/iou"] for r in history])
    assert by_key["run_stop"]["metadata"]["status"] == "success"
    assert by_key["run_stop"]["metadata"]["time_to_target_s"] == m["time_to_target_s"]

    # the package's own checker, MLPerf HPC rules for DeepCam (open division)
    rc, problems = compliance(job / "mlperf.log", tmp_path)
    assert rc == 0 and problems == [], problems


@pytest.mark.slow
def test_without_reaching_deepcams_quality_only_the_convergence_rule_fails(hpctrain, tmp_path):
    job = tmp_path / "short"
    # IoU of a 4-channel-wide U-Net after one epoch on 24 samples is ~0.005
    assert hpctrain("fit", *DEEPCAM_TINY, "--trainer.max_epochs=2", f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert m["target"] is None and m["target_reached"] is None and m["time_to_target_s"] is None
    stop = [x for x in mllog_lines(job / "mlperf.log") if x["key"] == "run_stop"]
    assert len(stop) == 1 and stop[0]["metadata"]["status"] == "aborted"  # no target: none reached
    rc, problems = compliance(job / "mlperf.log", tmp_path)
    assert problems == [f"WARNING -  {CONVERGENCE_RULE}", "ERROR - FAILED"] and rc == 1, problems


@pytest.mark.slow
def test_target_iou_stops_at_the_first_validation_that_reaches_it(hpctrain, tmp_path):
    job = tmp_path / "target"
    # ~0.005 after one epoch (see above): 0.001 is reached at once
    assert hpctrain("fit", *DEEPCAM_TINY, "--trainer.max_epochs=4", "--run.target=0.001",
                    f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert is_complete(m)
    assert m["training"]["epochs_completed"] == 1 and [r["epoch"] for r in m["metrics"]["history"]] == [0]
    assert m["target"] == {"metric": "val/iou", "mode": "max", "value": 0.001, "epoch": 0}
    assert m["target_reached"] is True and 0 < m["time_to_target_s"] < m["training"]["attempt_seconds"]
    lines = mllog_lines(job / "mlperf.log")
    assert [x["metadata"]["status"] for x in lines if x["key"] == "run_stop"] == ["success"]
    assert [x["value"] for x in lines if x["key"] == "target_accuracy"] == [0.001]


@pytest.mark.slow
def test_a_target_never_reached_trains_every_epoch(hpctrain, tmp_path):
    job = tmp_path / "unreached"
    assert hpctrain("fit", *DEEPCAM_TINY, "--trainer.max_epochs=2", "--run.target=0.99", "--run.mlperf=false",
                    "--run.tensorboard=false", f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert m["training"]["epochs_completed"] == 2
    assert m["target_reached"] is False and m["time_to_target_s"] is None
    assert m["mlperf_log"] is None and m["tensorboard"] is None
    assert not (job / "mlperf.log").exists() and not (job / "tensorboard").exists()


def test_the_surrogate_writes_tensorboard_but_no_mlperf_log(hpctrain, borehole_csv, tmp_path):
    job = tmp_path / "surrogate"
    assert hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", "--run.tracking=off",
                    f"--run.job_dir={job}") == 0
    m = load_manifest(job)
    assert m["mlflow"] is None and m["mlperf_log"] is None and not (job / "mlperf.log").exists()
    assert {"val/loss", "val/rmse"} <= scalar_tags(job / m["tensorboard"])  # TensorBoard alone without MLflow


def test_a_target_without_validation_is_a_config_error(hpctrain, borehole_csv, tmp_path, capsys):
    job = tmp_path / "noval"
    assert hpctrain("fit", *SURROGATE_TINY, f"--data.path={borehole_csv}", "--trainer.limit_val_batches=0",
                    "--run.target=0.5", f"--run.job_dir={job}") == 2
    assert "nothing is validated" in capsys.readouterr().err


@pytest.mark.slow
def test_a_requeued_deepcam_job_keeps_one_mlperf_run_and_one_training_clock(hpctrain, tmp_path):
    """Preempted after its first epoch, then resumed: still one run_start and one run_stop, the
    checker still passes, and time_to_target_s counts training time only (not the gap)."""
    import signal
    import time

    from hpctrain_testing import spawn

    job = tmp_path / "requeued"
    args = ["fit", *DEEPCAM_CONVERGING, "--run.target=0.82", "--run.tracking=off", f"--run.job_dir={job}"]
    proc = spawn(args)
    deadline = time.monotonic() + 150
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            log = job / "mlperf.log"
            if log.is_file() and '"key": "epoch_stop"' in log.read_text():
                proc.send_signal(signal.SIGUSR2)
                break
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out
    first = load_manifest(job)
    assert first["status"] == "preempted" and first["target_reached"] is False
    time.sleep(1.0)  # the queue: not training time

    assert hpctrain(*args) == 0
    m = load_manifest(job)
    assert is_complete(m) and m["target_reached"] is True and len(m["training"]["attempts"]) == 2
    assert m["time_to_target_s"] < sum(a for a in (first["training"]["attempt_seconds"],
                                                   m["training"]["attempt_seconds"]))
    keys = [x["key"] for x in mllog_lines(job / "mlperf.log")]
    assert keys.count("run_start") == keys.count("init_stop") == keys.count("run_stop") == 1
    rc, problems = compliance(job / "mlperf.log", tmp_path)
    assert rc == 0 and problems == [], problems
