"""MlflowHook: tracking runs and model versions for finished Slurm trainings, idempotently.

Connection ``mlflow_default`` (type HTTP): host, port, schema (http/https), login and password
for MLflow's basic auth. Every training is keyed by its run key (dag, run, task, map index):
the MLflow run carries it as the tag ``slurmflow.run_key`` and its model version as well, so a
retried or re-run registration finds and reuses them instead of creating duplicates.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from slurmflow.secrets import mlflow_credentials

RUN_KEY_TAG = "slurmflow.run_key"
_RUN_ID_RE = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")  # what may go into a search filter unescaped
#: MLflow's retry backoff factor (not a secret: an environment variable MLflow reads per request).
BACKOFF_ENV = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"

# --- credentials without os.environ ------------------------------------------------------------
# MLflow's REST client (tracking, registry and artifact repositories alike) asks
# mlflow.utils.credentials.read_mlflow_creds() for basic-auth credentials on every request, and
# that reads the process environment. Instead of writing the password there (inherited by every
# child process, left behind after the task), read_mlflow_creds is wrapped once to answer with
# the credentials of the client calls in progress. A plain global, not a context variable,
# because MLflow moves artifact transfers to its own thread pool, whose threads must see the
# credentials of the call too. Calls with the *same* credentials run side by side (a sweep
# registers its trials from a thread pool); calls with other credentials wait their turn.
_auth_turn = threading.Condition()
_active_creds: tuple[str, str] | None = None
_holders = 0
_held = threading.local()  # this thread's credentials and depth, to refuse a deadlocking nest


def _install_reader() -> None:
    from mlflow.utils import credentials

    if getattr(credentials.read_mlflow_creds, "slurmflow_scoped", False):
        return
    original = credentials.read_mlflow_creds

    def read_mlflow_creds():
        active = _active_creds
        return credentials.MlflowCreds(*active) if active is not None else original()

    read_mlflow_creds.slurmflow_scoped = True
    credentials.read_mlflow_creds = read_mlflow_creds


@contextmanager
def basic_auth(creds: tuple[str, str] | None) -> Iterator[None]:
    """MLflow clients in this block authenticate with ``creds`` (``(login, password)``; None:
    MLflow's own defaults). Nothing is written to ``os.environ``.

    Blocks with equal credentials may run at once in several threads; a block with other
    credentials waits until none of those is left.

    :raises RuntimeError: this thread is already inside a block with other credentials.
    """
    global _active_creds, _holders
    if creds is None:
        yield
        return
    _install_reader()
    mine = getattr(_held, "creds", None)
    if mine is not None and mine != creds:
        raise RuntimeError("nested MLflow calls with two different logins in one thread")
    with _auth_turn:
        while _holders and _active_creds != creds:
            _auth_turn.wait()
        _active_creds, _holders = creds, _holders + 1
    _held.creds, _held.depth = creds, getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
        if not _held.depth:
            _held.creds = None
        with _auth_turn:
            _holders -= 1
            if not _holders:
                _active_creds = None
                _auth_turn.notify_all()


class ScopedClient:
    """An :class:`mlflow.MlflowClient` whose every method call runs under :func:`basic_auth`."""

    def __init__(self, client: Any, creds: tuple[str, str] | None) -> None:
        self._client = client
        self._creds = creds

    def __repr__(self) -> str:  # never the password
        return f"ScopedClient({self._client.tracking_uri!r})"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with basic_auth(self._creds):
                return attr(*args, **kwargs)

        return call


class MlflowHook(BaseHook):
    """Thin, idempotent layer over :class:`mlflow.MlflowClient`.

    :param mlflow_conn_id: the Airflow connection of the tracking server.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id
        # MLflow retries a refused request 7 times, 2 s doubling (backoff factor 2): after an
        # outage the server is seen up to 2 min late (make chaos, stop-mlflow at register: 165 s).
        # Factor 1 caps the gap at 64 s; a longer outage fails the try and SERVICE_RETRIES retry.
        # Set here, before any request: also the clients MLflow code builds itself (credentials()).
        os.environ.setdefault(BACKOFF_ENV, "1")

    @cached_property
    def tracking_uri(self) -> str:
        conn = self.get_connection(self.mlflow_conn_id)
        port = f":{conn.port}" if conn.port else ""
        return f"{conn.schema or 'http'}://{conn.host}{port}"

    @cached_property
    def _creds(self) -> tuple[str, str] | None:
        return mlflow_credentials(self.mlflow_conn_id)  # masked by slurmflow.secrets

    @cached_property
    def client(self) -> ScopedClient:
        """The tracking server's client; every call carries this connection's login."""
        import mlflow  # heavy: only when a task really talks to MLflow

        return ScopedClient(mlflow.MlflowClient(tracking_uri=self.tracking_uri), self._creds)

    def credentials(self):
        """A block in which MLflow code that builds its own client (``hpctrain.offline.upload``,
        ``mlflow.pyfunc.load_model``) authenticates as this connection."""
        return basic_auth(self._creds)

    def ui_url(self, path: str) -> str:
        return f"{self.tracking_uri}/#/{path.lstrip('/')}"

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else self.client.create_experiment(name)

    def find_run(self, experiment: str, run_key: str):
        """The run registered under ``run_key``, or None."""
        runs = self.client.search_runs(
            [self.experiment_id(experiment)], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1
        )
        return runs[0] if runs else None

    def log_training(
        self,
        *,
        experiment: str,
        run_key: str,
        run_name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: Mapping[str, str | Path] = (),
        run_id: str | None = None,
    ) -> str:
        """Create (or find, or adopt) the MLflow run of a training and log its outcome.

        :param experiment: experiment name; created when missing.
        :param run_key: the deterministic key; a second call with the same key reuses the run.
        :param run_name: a readable name for the UI.
        :param params: hyperparameters (stringified; MLflow refuses a changed value for a key).
        :param metrics: final metrics, ``train/loss``-style names.
        :param tags: Slurm facts, image digest, code version...
        :param artifacts: artifact path -> local file or folder to upload.
        :param run_id: a run the training already logged live (online mode) to adopt.
        :return: the run id.
        """
        client = self.client
        run = self.find_run(experiment, run_key)
        if run is None and run_id:
            client.set_tag(run_id, RUN_KEY_TAG, run_key)
            run = client.get_run(run_id)
        if run is None:
            run = client.create_run(self.experiment_id(experiment), run_name=run_name, tags={RUN_KEY_TAG: run_key})
        self.log_outcome(run, params=params, metrics=metrics, tags=tags, artifacts=artifacts)
        return run.info.run_id

    def log_outcome(self, run: Any, *, params: Mapping[str, Any], metrics: Mapping[str, float],
                    tags: Mapping[str, str], artifacts: Mapping[str, str | Path] = (),
                    status: str | None = "FINISHED") -> None:
        """Log a training's outcome onto ``run`` (an MLflow ``Run``): artifacts, then params,
        metrics and tags in one ``log_batch``, then its end state.

        The tags go last-but-one on purpose: a caller that marks "registered" with a tag (a
        sweep's run key) sees that mark only once the artifacts are there too.

        :param params: only those the run does not hold yet are logged (MLflow refuses a
            changed value for a logged key).
        :param status: the run's end state, set when it differs (None: leave it).
        """
        from mlflow.entities import Metric, Param, RunTag

        client, rid = self.client, run.info.run_id
        for dest, local in dict(artifacts).items():
            local = Path(local)
            if local.is_dir():
                client.log_artifacts(rid, str(local), dest)
            elif local.exists():
                client.log_artifact(rid, str(local), dest)
        logged = run.data.params
        client.log_batch(
            rid,
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
            params=[Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged],
            tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
        )
        if status and run.info.status != status:
            client.set_terminated(rid, status)

    def runs_by_tag(self, experiment_ids: list[str], tag: str, value: str, page: int = 1000) -> list[Any]:
        """Every run whose ``tag`` equals ``value`` (all pages)."""
        found, token = [], None
        while True:
            batch = self.client.search_runs(experiment_ids, filter_string=f"tags.`{tag}` = '{value}'",
                                            max_results=page, page_token=token)
            found += list(batch)
            token = batch.token
            if not token:
                return found

    def runs_by_id(self, experiment_ids: list[str], run_ids: list[str], chunk: int = 200) -> dict[str, Any]:
        """The runs with these ids (data included), a few searches for any number of runs.

        :param chunk: ids per search (the filter string grows with each).
        """
        found: dict[str, Any] = {}
        for start in range(0, len(run_ids), chunk):
            ids = ", ".join(f"'{r}'" for r in run_ids[start:start + chunk] if _RUN_ID_RE.match(r))
            if not ids:
                continue
            token = None
            while True:
                page = self.client.search_runs(experiment_ids, filter_string=f"attributes.run_id IN ({ids})",
                                               max_results=chunk, page_token=token)
                found.update({r.info.run_id: r for r in page})
                token = page.token
                if not token:
                    break
        return found

    def register_model(self, name: str, run_id: str, artifact_path: str, tags: Mapping[str, str]) -> str:
        """Register the run's model as a version of ``name`` once; later calls return that version.

        :return: the model version number (as a string, as MLflow returns it).
        """
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.create_registered_model(name, description="Trained on Slurm by slurmflow")
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return mv.version
        mv = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=dict(tags))
        return mv.version

    def version_by_alias(self, name: str, alias: str):
        """The model version holding ``alias``, or None when MLflow says there is none.

        Only a real "no such alias / no such model" means None; any other error (auth, network,
        a server error) raises, so a promotion never mistakes doubt for "no champion yet".
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if is_missing(exc):
                return None
            raise

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


def is_missing(exc: Exception) -> bool:
    """MLflow's answer "that model or alias does not exist" (not an auth, network or server error).

    A missing model is ``RESOURCE_DOES_NOT_EXIST``; a missing alias on an existing model is
    ``INVALID_PARAMETER_VALUE`` with "alias ... not found" (MLflow 3.17's registry).
    """
    code = str(getattr(exc, "error_code", ""))
    message = str(exc).lower()
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message
    )
