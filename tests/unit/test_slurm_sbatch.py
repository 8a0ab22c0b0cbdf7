"""sbatch rendering: golden script, option validation, quoting, secrets, log path patterns.

Regenerate the golden file after an intended template change with
``SLURMFLOW_UPDATE_GOLDEN=1 pytest tests/unit/test_slurm_sbatch.py``.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from slurmflow.identity import JobKey
from slurmflow.sbatch import (
    OPTIONS,
    SbatchOptionError,
    build_script,
    expand_log_path,
    normalize_options,
    render_script,
)
from slurmflow.secrets import JobSecrets
from tests.unit.fixtures.slurm.fakes import FIXTURES

KEY = JobKey("train_dag", "manual__2024-05-01T00:00:00+00:00", "fit", 3)
NASTY = "a'b $(touch /tmp/canary) `id` ; | & > < \"q\" \\ \nline2"


def full_script():
    return build_script(
        command='docker run --rm "$IMAGE" python -m hpctrain fit --config /cfg.yaml',
        job_name=KEY.job_name(1),
        job_dir=KEY.job_dir("/home/u/slurmflow-jobs", 1),
        options={
            "partition": "debug",
            "account": "research",
            "qos": "normal",
            "nodes": 1,
            "ntasks-per-node": 2,
            "gpus": "a100:1",
            "gres": "gpu:a100:1",
            "cpus_per_task": 4,
            "mem": "16G",
            "time": "1:00:00",
            "array": "0-9%2",
            "signal": "B:USR2@120",
            "requeue": True,
            "output": "logs/%A_%a.out",
            "error": "logs/%A_%a.err",
        },
        environment={"IMAGE": "127.0.0.1:5000/slurmflow/train@sha256:abc", "WEIRD": NASTY},
        secret_names=("MLFLOW_TRACKING_PASSWORD",),
        comment=KEY.comment(1),
        setup="module load cuda",
    )


def test_golden_script():
    text = render_script(full_script())
    golden = FIXTURES / "golden_job.sbatch"
    if os.environ.get("SLURMFLOW_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_script_is_valid_bash_and_sources_the_secrets_by_path():
    text = render_script(full_script())
    subprocess.run(["bash", "-n"], input=text.encode(), check=True)  # noqa: S603,S607
    assert "MLFLOW_TRACKING_PASSWORD" not in text  # not even the names: the file exports them
    assert ". /home/u/slurmflow-jobs/train_dag/" in text and ".slurmflow-secrets.env" in text


def test_environment_values_stay_literal_in_bash(tmp_path):
    """Source the rendered exports in a real bash: the nasty value comes back byte for byte."""
    script = build_script(command="true", job_name="x", job_dir=str(tmp_path), environment={"WEIRD": NASTY})
    exports = [line for line in render_script(script).splitlines(keepends=True)]
    start = next(i for i, line in enumerate(exports) if line.startswith("export WEIRD="))
    body = "".join(exports[start : start + 2]) + 'printf %s "$WEIRD"'
    out = subprocess.run(["bash", "-c", body], capture_output=True, check=True, cwd=tmp_path)  # noqa: S603,S607
    assert out.stdout.decode() == NASTY
    assert not (tmp_path / "canary").exists()


def test_secrets_file_round_trips(tmp_path):
    text = JobSecrets({"TOKEN": NASTY, "B": "plain"}).file_text()
    path = tmp_path / "s.env"
    path.write_text(text)
    out = subprocess.run(
        ["bash", "-c", f'. {shlex.quote(str(path))}; printf %s "$TOKEN"'], capture_output=True, check=True
    )  # noqa: S603,S607
    assert out.stdout.decode() == NASTY


def test_unknown_option_lists_valid_ones():
    with pytest.raises(SbatchOptionError) as err:
        normalize_options({"partiton": "debug"})
    message = str(err.value)
    assert "partiton" in message
    for name in ("partition", "account", "array", "gres", "time"):
        assert name in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("partition", "debug; rm -rf /"),
        ("account", "$(id)"),
        ("nodes", 0),
        ("ntasks_per_node", -1),
        ("cpus_per_task", "four"),
        ("cpus_per_task", True),
        ("mem", "16 GB"),
        ("time", "1 hour"),
        ("array", "0-9%2;id"),
        ("signal", "USR2@120; id"),
        ("gres", "gpu:a100:1 --wrap=id"),
        ("gpus", "all"),
        ("requeue", "yes"),
        ("output", "/tmp/x\n#SBATCH --wrap=id"),
        ("output", "/tmp/it's"),
        ("mail_user", "nobody"),
    ],
)
def test_invalid_values_are_rejected(key, value):
    with pytest.raises(SbatchOptionError) as err:
        normalize_options({key: value})
    assert key.replace("-", "_") in str(err.value)


def test_reserved_options_cannot_be_overridden():
    for key in ("job_name", "job-name", "comment"):
        with pytest.raises(SbatchOptionError, match="set by slurmflow"):
            normalize_options({key: "x"})


def test_options_normalize_dashes_and_drop_none():
    assert normalize_options({"ntasks-per-node": 2, "--qos": "normal", "account": None}) == {
        "ntasks_per_node": "2",
        "qos": "normal",
    }


def test_every_option_has_a_flag():
    assert all(spec.flag.startswith("--") for spec in OPTIONS.values())


def test_paths_made_absolute_and_log_dirs_listed():
    script = build_script(command="true", job_name="n", job_dir="/j/d", options={"output": "logs/%j.out"})
    assert script.options["output"] == "/j/d/logs/%j.out"
    assert script.options["chdir"] == "/j/d"
    assert script.directories == ["/j/d", "/j/d/logs"]
    assert script.output_pattern == "/j/d/logs/%j.out"


def test_bad_inputs():
    with pytest.raises(SbatchOptionError, match="command is empty"):
        build_script(command="  ", job_name="n", job_dir="/j")
    with pytest.raises(SbatchOptionError, match="absolute"):
        build_script(command="true", job_name="n", job_dir="relative")
    with pytest.raises(SbatchOptionError, match="variable name"):
        build_script(command="true", job_name="n", job_dir="/j", environment={"BAD-NAME": "x"})
    with pytest.raises(SbatchOptionError, match="variable name"):
        build_script(command="true", job_name="n", job_dir="/j", environment={"X=$(id)": "x"})
    with pytest.raises(SbatchOptionError, match="both plain and secret"):
        build_script(command="true", job_name="n", job_dir="/j", environment={"A": "1"}, secret_names=("A",))


def test_signal_forwarding_only_for_batch_shell_signals():
    plain = render_script(build_script(command="true", job_name="n", job_dir="/j", options={"signal": "USR2@60"}))
    assert "trap" not in plain
    forwarded = render_script(build_script(command="true", job_name="n", job_dir="/j", options={"signal": "B:SIGUSR2@60"}))
    assert "kill -s USR2" in forwarded


@pytest.mark.parametrize(
    ("pattern", "task", "expected"),
    [
        ("/j/slurm-%j.out", None, "/j/slurm-42.out"),
        ("/j/slurm-%A_%a.out", 3, "/j/slurm-42_3.out"),
        ("/j/%x-%u-%%.out", None, "/j/name-user-%.out"),
        ("/j/%5j.out", None, "/j/00042.out"),
        ("/j/%N.out", None, None),
        ("/j/%j.out", 3, None),
    ],
)
def test_expand_log_path(pattern, task, expected):
    assert expand_log_path(pattern, "42", task, user="user", job_name="name") == expected
