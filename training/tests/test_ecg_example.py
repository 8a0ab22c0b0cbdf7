"""The worked "add your own model" example: generated ECG rhythms, a 1-D CNN, its config.

It lives in three new files of training/ and touches nothing else (the test at the bottom, and
tests/unit/test_experiment_configs.py for the Airflow side's automatic pick-up of its config).
"""

from __future__ import annotations

import json
import subprocess

import torch
from hpctrain_testing import CONFIGS, REPO

from hpctrain.data.ecg import CLASSES, generate, generate_sample

#: every file the example consists of: nothing outside training/, and no edit to an existing file
EXAMPLE_FILES = ("training/src/hpctrain/tasks/ecg.py", "training/src/hpctrain/data/ecg.py",
                 "training/configs/ecg.yaml", "training/tests/test_ecg_example.py")

TINY = ["--config", str(CONFIGS / "ecg.yaml"), "--trainer.max_epochs=2", "--data.num_samples=96",
        "--data.length=128", "--data.batch_size=16", "--model.width=4", "--model.depth=2",
        "--run.num_threads=1", "--run.tracking=off", "--run.tensorboard=false",
        "--trainer.enable_model_summary=false"]


def test_generated_recordings_are_deterministic_by_seed():
    a, b = generate_sample(7, 3), generate_sample(7, 3)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (1, 512) and a[0].dtype == torch.float32
    assert not torch.equal(generate_sample(8, 3)[0], a[0])
    x, y = generate(0, 200)
    assert x.shape == (200, 1, 512) and set(y.tolist()) == set(range(len(CLASSES)))


def test_rhythms_differ_in_rate():
    """Bradycardia has fewer R peaks than tachycardia in the same window (the labels mean something)."""
    def peaks(signal: torch.Tensor) -> int:
        s = signal[0]
        return int(((s[1:-1] > s[:-2]) & (s[1:-1] >= s[2:]) & (s[1:-1] > 0.5 * s.max())).sum())

    x, y = generate(1, 120, noise=0.0)
    brady = [peaks(x[i]) for i in range(len(y)) if y[i] == 1]
    tachy = [peaks(x[i]) for i in range(len(y)) if y[i] == 2]
    assert max(brady) < min(tachy)


def test_tiny_fit_on_cpu_exports_a_loadable_classifier(hpctrain, tmp_path):
    job = tmp_path / "job"
    assert hpctrain("fit", *TINY, f"--run.job_dir={job}") == 0
    result = json.loads((job / "result.json").read_text())
    assert result["status"] == "completed" and result["task"] == "hpctrain.tasks.ecg.ECGClassifier"
    assert result["monitor"] == {"metric": "val/accuracy", "mode": "max"}
    assert [row["epoch"] for row in result["metrics"]["history"]] == [0, 1]
    assert 0.0 <= result["metrics"]["final"]["val/f1"] <= 1.0
    assert result["data"]["kind"] == "synthetic" and result["data"]["generator"] == "hpctrain.data.ecg/v1"
    assert result["model"]["init_args"]["num_classes"] == 4  # a shape the data decided

    from hpctrain.export import load_model

    model = load_model(job / "model")
    x, _ = generate(0, 3, length=128)
    assert model(x).shape == (3, 4)


def test_the_example_is_only_new_files_in_training():
    """Adding a model is adding files under training/: the example's files are all there, and no
    file outside training/ names it (the Airflow side finds configs by listing training/configs)."""
    for path in EXAMPLE_FILES:
        assert path.startswith("training/") and (REPO / path).is_file(), path
    tracked = subprocess.run(["git", "-C", str(REPO), "grep", "-l", "-i", "-e", "ecg", "--", "plugins", "dags",
                              "docker", "include"], capture_output=True, text=True)
    assert tracked.stdout.strip() == "", tracked.stdout
    # the package's __init__ files do not list it either: the config names the class by module path
    inits = (REPO / "training/src/hpctrain/tasks/__init__.py").read_text() + \
        (REPO / "training/src/hpctrain/data/__init__.py").read_text()
    assert "ecg" not in inits.lower()
