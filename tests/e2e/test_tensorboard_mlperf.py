"""TensorBoard and MLPerf logging through the real Trigger path: a deepcam training to IoU 0.82.

The job writes TensorBoard event files and an MLPerf HPC ``mlperf.log`` into its job dir; the
``register`` task logs both on the MLflow run (``tensorboard/``, ``mlperf/mlperf.log``) with the
``time_to_target_s`` metric. The log read back from MLflow passes the ``mlperf-logging`` package's
own compliance checker (HPC ruleset 3.0.0, open division, DeepCam).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

RULESET = "3.0.0"


def test_deepcam_to_target_logs_tensorboard_and_a_compliant_mlperf_log(run_dag, api, mlflow_client, tmp_path):
    # small enough to reach MLPerf DeepCam's IoU 0.82 in about 5 short epochs (training/tests/test_side_logs.py)
    conf = {"task": "deepcam", "target_iou": 0.82, "max_epochs": 15, "width": 8, "lr": 0.005, "batch_size": 8,
            "overrides": ["--data.num_samples=160", "--data.height=32", "--data.width=32"],
            "model_name": f"e2e-mlperf-{uuid.uuid4().hex[:6]}"}
    run, states = run_dag("train_model", conf)
    assert run["state"] == "success", states
    reg = api.xcom("train_model", run["dag_run_id"], "register")
    run_id = reg["run_id"]

    events = [a.path for a in mlflow_client.list_artifacts(run_id, "tensorboard")]
    assert any(Path(p).name.startswith("events.out.tfevents.") for p in events), events
    metrics = mlflow_client.get_run(run_id).data.metrics
    assert metrics["time_to_target_s"] > 0 and metrics["best/val/iou"] >= 0.82, metrics

    log = Path(mlflow_client.download_artifacts(run_id, "mlperf/mlperf.log", str(tmp_path)))
    lines = log.read_text().splitlines()
    assert sum('"key": "run_stop"' in line and '"status": "success"' in line for line in lines) == 1
    report = tmp_path / "compliance.log"
    checked = subprocess.run(
        [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc", "--ruleset", RULESET,
         "--log_output", str(report), str(log)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, report.read_text()[-3000:]
    # the training stopped at the target, before its last epoch
    epochs = [line for line in lines if '"key": "epoch_stop"' in line]
    assert 0 < len(epochs) < conf["max_epochs"], len(epochs)
