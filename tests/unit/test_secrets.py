"""The one secrets path (slurmflow.secrets) and MLflow's scoped credentials, with connections
from environment variables (no Airflow DB needed)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote_plus

import pytest
from airflow.sdk._shared.secrets_masker import redact

from slurmflow.hooks.mlflow import ScopedClient, basic_auth
from slurmflow.secrets import (
    JOB_SECRET_NAMES,
    MONGO_URI,
    JobSecrets,
    SecretRefs,
    gather,
    mask_refs,
)

MLFLOW_PW = "mlflow-pw-4f1c9a"
MONGO_PW = "p@ss/w:rd+Mg7"  # URL-quoted in the URI: both forms must be masked
REGISTRY_PW = "registry-pw-77b2e0"


@pytest.fixture
def connections(monkeypatch):
    conns = {
        "mlflow_t": {"conn_type": "http", "host": "mlflow.example.org", "port": 5001, "login": "alice",
                     "password": MLFLOW_PW},
        "mongo_t": {"conn_type": "mongo", "host": "db.example.org", "port": 27017, "schema": "campaigns",
                    "login": "trainer", "password": MONGO_PW,
                    "extra": {"srv": False, "ssl": True, "authSource": "admin"}},
        "registry_t": {"conn_type": "docker", "host": "registry.example.org:5000", "login": "robot",
                       "password": REGISTRY_PW},
        "mlflow_anon": {"conn_type": "http", "host": "mlflow.example.org"},
    }
    for conn_id, conn in conns.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return SecretRefs(mlflow_conn_id="mlflow_t", mongo_conn_id="mongo_t", registry_conn_id="registry_t")


def test_gather_reads_every_credential_from_the_connections(connections):
    secrets = gather(connections)
    assert secrets.names == ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MONGO_URI")
    assert set(secrets.names) <= set(JOB_SECRET_NAMES)
    uri = secrets.environment[MONGO_URI]
    # the mongo provider's URI plus the connection's client options: the job connects as Airflow does
    assert uri == f"mongodb://trainer:{quote_plus(MONGO_PW)}@db.example.org:27017/campaigns?ssl=true&authSource=admin"
    values = secrets.values()
    for value in (MLFLOW_PW, MONGO_PW, quote_plus(MONGO_PW), uri, REGISTRY_PW, secrets.registry.token):
        assert value in values
    assert "alice" not in values and "robot" not in values  # logins are staged, not masked
    assert values == sorted(values, key=len, reverse=True)  # a URI is masked whole
    assert "registry.example.org:5000" in json.loads(secrets.registry_files()["config.json"])["auths"]


def test_nothing_shows_a_value(connections):
    secrets = gather(connections)
    text = repr(secrets) + repr(secrets.registry) + repr(connections) + json.dumps(connections.to_dict())
    for value in secrets.values():
        assert value not in text
    assert "MONGO_URI" in repr(secrets)


def test_mask_hides_every_value_even_under_a_harmless_name(connections):
    secrets = gather(connections)
    uri = secrets.environment[MONGO_URI]
    line = f"job says MONGO_URI={uri} pw={MLFLOW_PW} raw={MONGO_PW} reg={REGISTRY_PW} token={secrets.registry.token}"
    secrets.mask()
    masked = redact(line)
    for value in secrets.values():
        assert value not in masked, value
    assert masked.startswith("job says MONGO_URI=***")


def test_mask_refs_masks_in_a_process_that_never_saw_the_values(connections, monkeypatch):
    """The triggerer's side: only the references travel; the values are read and masked there."""
    calls = []
    monkeypatch.setattr("airflow.sdk.log.mask_secret", lambda value, name=None: calls.append((value, name)))
    assert mask_refs(connections.to_dict()) == len(gather(connections).values())
    # (Airflow masks a connection's password and extra itself when it reads one: not enough for
    # a URI around a quoted password or a registry token.) No name: the masker skips a value
    # whose name does not look sensitive, and MONGO_URI does not.
    unnamed = {value for value, name in calls if name is None and isinstance(value, str)}
    secrets = gather(connections)
    assert {MLFLOW_PW, MONGO_PW, quote_plus(MONGO_PW), REGISTRY_PW, secrets.registry.token,
            secrets.environment[MONGO_URI]} <= unnamed


def test_the_secrets_file_is_sourced_back_to_the_exact_values(connections, tmp_path):
    hostile = "it's $(touch /tmp/x) `id` \"q\"\nline2"
    secrets = gather(connections, extra={"EXTRA_TOKEN": hostile})
    path = tmp_path / "secrets.env"
    path.write_text(secrets.file_text())
    shown = subprocess.run(
        ["bash", "-c", '. "$1"; printf "%s\\0" "$MONGO_URI" "$MLFLOW_TRACKING_PASSWORD" "$EXTRA_TOKEN"', "sh", str(path)],
        capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.split("\0")[:3]
    assert shown == [secrets.environment[MONGO_URI], MLFLOW_PW, hostile]
    assert REGISTRY_PW not in secrets.file_text()  # registry logins live in the auth_dir only


def test_connections_without_credentials_give_no_variables(connections):
    secrets = gather(SecretRefs(mlflow_conn_id="mlflow_anon"))
    assert secrets.names == () and secrets.file_text() is None and secrets.values() == []
    with pytest.raises(ValueError, match="no registry connection"):
        secrets.registry_files()


def test_refused_names_and_references():
    with pytest.raises(ValueError, match="invalid secret variable name"):
        JobSecrets({"BAD-NAME": "x"})
    with pytest.raises(ValueError, match="NUL"):
        JobSecrets({"A": "x\x00y"})
    with pytest.raises(ValueError, match="unknown secret references"):
        SecretRefs.from_dict({"vault": "x"})
    refs = SecretRefs(mongo_conn_id="m")
    assert SecretRefs.from_dict(refs.to_dict()) == refs and bool(refs) and not SecretRefs()
    assert SecretRefs.from_dict(None) == SecretRefs()


def test_conflicting_explicit_variable(connections):
    with pytest.raises(ValueError, match="both by a connection and explicitly: MONGO_URI"):
        gather(connections, extra={MONGO_URI: "mongodb://other"})


# --- MLflow: credentials per call, never in os.environ --------------------------------------------


class FakeMlflowClient:
    tracking_uri = "http://mlflow.example.org"

    def whoami(self):
        from mlflow.utils import credentials

        return credentials.get_default_host_creds(self.tracking_uri).username

    def whoami_in_pool(self):
        # MLflow moves artifact transfers to its own threads: they must see the call's login too
        with ThreadPoolExecutor(2) as pool:
            return pool.submit(self.whoami).result()


def test_scoped_client_authenticates_each_call_without_the_environment(monkeypatch):
    from mlflow.utils import credentials

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    client = ScopedClient(FakeMlflowClient(), ("alice", MLFLOW_PW))
    assert client.whoami() == "alice" and client.whoami_in_pool() == "alice"
    assert client.tracking_uri == FakeMlflowClient.tracking_uri and MLFLOW_PW not in repr(client)
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "MLFLOW_TRACKING_USERNAME" not in os.environ
    # outside a call MLflow's own defaults apply again (here: none)
    assert credentials.get_default_host_creds("http://x").username is None
    with basic_auth(("bob", "pw-bob-123")):
        assert credentials.read_mlflow_creds() == ("bob", "pw-bob-123")
        with basic_auth(("bob", "pw-bob-123")):  # nested with the same login: fine
            assert credentials.read_mlflow_creds().username == "bob"
        # another login inside would wait for itself: refused instead of a deadlock
        with pytest.raises(RuntimeError, match="two different logins"), basic_auth(("carol", "pw-carol-1")):
            pass
        assert credentials.read_mlflow_creds().username == "bob"
    assert credentials.read_mlflow_creds().username is None


def test_calls_with_different_logins_take_turns():
    seen, gate = [], threading.Barrier(2)

    class Slow(FakeMlflowClient):
        def whoami(self):
            who = super().whoami()
            seen.append(who)
            return who

    a, b = ScopedClient(Slow(), ("alice", "pw-alice-1")), ScopedClient(Slow(), ("bob", "pw-bob-123"))

    def call(client):
        gate.wait()
        return [client.whoami() for _ in range(50)]

    with ThreadPoolExecutor(2) as pool:
        ra, rb = pool.submit(call, a), pool.submit(call, b)
        assert set(ra.result()) == {"alice"} and set(rb.result()) == {"bob"}


def test_calls_with_the_same_login_run_side_by_side():
    """A sweep registers its trials from a thread pool: one login must not serialise them."""
    inside, gate = [], threading.Barrier(4, timeout=10)

    class Meeting(FakeMlflowClient):
        def whoami(self):
            gate.wait()  # all four calls are inside basic_auth at once, or this times out
            inside.append(super().whoami())
            return inside[-1]

    client = ScopedClient(Meeting(), ("alice", "pw-alice-1"))
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: client.whoami(), range(4))) == ["alice"] * 4


# --- the operator and the trigger: values in the secrets file only, references in the trigger ------


def test_the_operator_stages_the_values_in_the_file_and_hands_the_trigger_references_only(connections):
    from airflow.sdk.exceptions import TaskDeferred

    from slurmflow.operators.slurm import SlurmSubmitJobOperator
    from tests.unit.fixtures.slurm.fakes import FakeCluster, fake_hook
    from tests.unit.test_slurm_operator import FakeTI

    cluster = FakeCluster()
    op = SlurmSubmitJobOperator(task_id="train", command='echo "$MONGO_URI"', secret_refs=connections,
                                sbatch_options={"account": "research"})
    op.__dict__["hook"] = fake_hook(cluster)
    ti = FakeTI()
    op.render_template_fields({"ti": ti})
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    secrets = gather(connections)
    job = ti.xcom["slurm_job"]
    staged = cluster.files[job["secrets_path"]]
    assert f"export MONGO_URI={secrets.environment[MONGO_URI]!r}" in staged and MLFLOW_PW in staged
    put = next(c for c in cluster.calls if c[:2] == ["sftp-put", job["secrets_path"]])
    assert put[2] == "0o600"
    _, kwargs = deferred.value.trigger.serialize()
    assert kwargs["secret_refs"] == connections.to_dict()
    # nowhere else: not the script, the XCom record, the trigger's stored kwargs, the rendered fields
    rendered = {f: getattr(op, f) for f in op.template_fields}
    for text in (cluster.files[job["script_path"]], json.dumps(job), json.dumps(kwargs), repr(rendered)):
        for value in secrets.values():
            assert value not in text
    assert f". {job['secrets_path']}" in op.sbatch_script


def test_the_training_operator_reads_mlflow_mongo_and_registry():
    from slurmflow.pipeline.tasks import TrainingJobOperator

    op = TrainingJobOperator(task_id="train", command="true")
    assert op.secret_refs == SecretRefs("mlflow_default", "mongo_default", "registry_default")
    assert ". /JOB_ROOT/" in op.preview_script()  # sources a secrets file, without reading a connection


def test_the_trigger_masks_before_the_first_line_and_holds_the_log_rather_than_show_one(connections, monkeypatch, tmp_path):
    import asyncio

    from slurmflow import poller as poller_mod
    from slurmflow.triggers import slurm as trigger_mod
    from tests.unit.fixtures.slurm.fakes import FakeAsyncHook, FakeCluster
    from tests.unit.test_slurm_trigger import RecordingLog, first_event

    cluster = FakeCluster()
    monkeypatch.setattr(poller_mod, "COALESCE_SECONDS", 0.0)
    monkeypatch.setattr(poller_mod, "LINGER_SECONDS", 0.0)
    monkeypatch.setattr(poller_mod, "_default_hook", lambda conn_id: FakeAsyncHook(cluster))
    job = cluster.add_job("a", "COMPLETED")
    (tmp_path / f"slurm-{job.job_id}.out").write_text(f"MONGO_URI={gather(connections).environment[MONGO_URI]}\n")
    order: list[str] = []

    def make():
        trigger = trigger_mod.SlurmJobTrigger(job_id=job.job_id, secret_refs=connections.to_dict(),
                                              paths={"job_dir": str(tmp_path), "output": str(tmp_path / "slurm-%j.out")},
                                              settings={"poll_interval": 0.01, "max_poll_interval": 0.02})
        trigger._log = RecordingLog()
        trigger._log.info = lambda msg, *args: order.append(msg % args)
        return trigger

    monkeypatch.setattr(trigger_mod, "mask_refs", lambda refs: order.append(f"mask {sorted(refs)}") or 5)
    assert asyncio.run(first_event(make()))["status"] == "success"
    assert order[0] == "mask ['mlflow_conn_id', 'mongo_conn_id', 'registry_conn_id']"
    assert any("MONGO_URI=" in line for line in order[1:])

    def unreadable(refs):
        raise RuntimeError("connection mongo_t unreachable")

    monkeypatch.setattr(trigger_mod, "mask_refs", unreadable)
    order.clear()
    trigger = make()
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "success"  # the wait goes on; only the log is held back
    assert not any("MONGO_URI=" in line for line in order)
    assert any("until its secrets are masked" in line for line in trigger.log.lines)
