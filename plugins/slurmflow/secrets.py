"""Every credential a job needs, in one place: gathered from connections, masked, staged by name.

A job's credentials come only from Airflow connections, named by :class:`SecretRefs` (connection
ids: plain strings, safe in a DAG, in trigger kwargs, in XCom). :func:`gather` resolves them
into a :class:`JobSecrets`, which

* registers every secret value with Airflow's secrets masker (:meth:`JobSecrets.mask`), so
  task logs, trigger logs and rendered fields show ``***``, lines the job itself prints included;
* renders the job's secrets file (:meth:`JobSecrets.file_text`): ``export NAME='value'`` lines
  that the operator uploads mode 600 into the job directory, that the batch script sources on
  the node, and that the operator deletes once the job has ended;
* tells the script and the container runtimes only variable NAMES (:attr:`JobSecrets.names`,
  :data:`JOB_SECRET_NAMES`): containers receive the values by name from the batch shell's
  environment (``docker run -e NAME``), never on a command line;
* renders the registry credential files jobs pull images with (:meth:`JobSecrets.registry_files`).

Where each secret lives:

==========================  ==========================  =========================  ==================
secret                      source (connection)         on the cluster             in the container
==========================  ==========================  =========================  ==================
MLFLOW_TRACKING_USERNAME    ``mlflow_default`` login    job's secrets file (600)   by name
MLFLOW_TRACKING_PASSWORD    ``mlflow_default`` password job's secrets file (600)   by name
MONGO_URI (with password)   ``mongo_default`` URI       job's secrets file (600)   by name
registry login / password   ``registry_default``        ``auth_dir`` files (600)   never (pull only)
==========================  ==========================  =========================  ==================

The triggerer is another process with its own masker, and trigger kwargs are stored in the
database: a trigger carries the :class:`SecretRefs` only and calls :func:`mask_refs` (through
``asgiref.sync.sync_to_async``: it reads connections) before it streams the job's first line.

Masked: passwords, tokens, URIs carrying a password (also the password's URL-quoted forms).
Not masked: logins, which Airflow does not mask either (masking ``admin`` would blank every word
``admin`` in every log); they still travel in the secrets file only.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit

MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
MONGO_URI = "MONGO_URI"
#: Every variable a training job may receive from its secrets file; the container runtimes pass
#: them by name (one that a job did not receive stays unset in the container too).
JOB_SECRET_NAMES: tuple[str, ...] = (MLFLOW_USERNAME, MLFLOW_PASSWORD, MONGO_URI)
#: Variables that name an identity, not a secret: staged like the others, never masked.
_LOGINS = frozenset({MLFLOW_USERNAME})



@dataclass(frozen=True)
class SecretRefs:
    """Where a job's credentials come from: Airflow connection ids, never values.

    :param mlflow_conn_id: MLflow (HTTP) connection: login/password become the job's
        ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (none without a login).
    :param mongo_conn_id: MongoDB connection: its URI, password included, becomes ``MONGO_URI``.
    :param registry_conn_id: image registry (docker) connection: its credentials are masked
        (a job can read its ``auth_dir``) and rendered by :meth:`JobSecrets.registry_files`;
        they are not put in the job's environment.
    """

    mlflow_conn_id: str | None = None
    mongo_conn_id: str | None = None
    registry_conn_id: str | None = None

    def __bool__(self) -> bool:
        return any(self.to_dict().values())

    def names(self) -> tuple[str, ...]:
        """The variables these references may give a job (without reading a connection)."""
        names = (MLFLOW_USERNAME, MLFLOW_PASSWORD) if self.mlflow_conn_id else ()
        return names + ((MONGO_URI,) if self.mongo_conn_id else ())

    def to_dict(self) -> dict[str, str | None]:
        return {"mlflow_conn_id": self.mlflow_conn_id, "mongo_conn_id": self.mongo_conn_id,
                "registry_conn_id": self.registry_conn_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | SecretRefs | None) -> SecretRefs:
        """From :meth:`to_dict` output (a trigger's kwargs); unknown keys are refused."""
        if isinstance(data, SecretRefs):
            return data
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls().to_dict()))
        if unknown:
            raise ValueError(f"unknown secret references {unknown}; valid: {sorted(cls().to_dict())}")
        return cls(**{k: (str(v) if v else None) for k, v in data.items()})


@dataclass(frozen=True)
class RegistryCredentials:
    """A registry login jobs pull with (from ``RegistryHook.job_credentials``).

    :param registry: ``host[:port]`` as in image references.
    """

    registry: str
    username: str
    password: str = field(repr=False)

    @property
    def token(self) -> str:
        """``base64(user:password)``: what Docker's ``config.json`` stores (a secret too)."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def secret_values(self) -> list[str]:
        return [self.password, self.token]


@dataclass(frozen=True)
class JobSecrets:
    """The resolved credentials of one job. Its ``repr`` shows variable names only.

    :param environment: variables of the job's secrets file (name -> value).
    :param registry: the registry login, if the references named one.
    :param hidden: further values to mask that are not variables (URL-quoted forms...).
    """

    environment: Mapping[str, str] = field(default_factory=dict, repr=False)
    registry: RegistryCredentials | None = field(default=None, repr=False)
    hidden: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # deferred: DAG parsing needs SecretRefs from this module, not sbatch
        from slurmflow.sbatch import validate_environment

        object.__setattr__(self, "environment", validate_environment(self.environment, "secret"))

    def __repr__(self) -> str:
        return f"JobSecrets(names={list(self.names)}, registry={self.registry is not None})"

    @property
    def names(self) -> tuple[str, ...]:
        """The variables the script sources and the container receives by name (sorted)."""
        return tuple(sorted(self.environment))

    def values(self) -> list[str]:
        """Every value to mask, longest first (so a URI is masked whole, not around its password)."""
        found = [v for k, v in self.environment.items() if k not in _LOGINS]
        found += self.hidden
        if self.registry:
            found += self.registry.secret_values()
        return sorted({v for v in found if v}, key=len, reverse=True)

    def mask(self) -> None:
        """Register every value with Airflow's secrets masker (this process and its supervisor)."""
        mask_values(self.values())

    def file_text(self) -> str | None:
        """Body of the job's mode-600 secrets file, sourced by the batch script; None if no variables."""
        if not self.environment:
            return None
        lines = ["# slurmflow: this job's secrets; mode 600, sourced by job.sbatch, deleted when the job ends"]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(self.environment.items())]
        return "\n".join(lines) + "\n"

    def registry_files(self) -> dict[str, str]:
        """Files of the ``auth_dir`` jobs pull with (stage them mode 600 in a mode-700 folder).

        :raises ValueError: the references named no registry.
        """
        from slurmflow.runtimes import registry_auth_files

        if self.registry is None:
            raise ValueError("no registry connection among this job's secret references")
        return registry_auth_files(self.registry.registry, self.registry.username, self.registry.password)


def mask_values(values: Iterable[str]) -> None:
    """Register ``values`` with Airflow's secrets masker.

    Without a name on purpose: the masker ignores a value whose name does not look sensitive
    (``MONGO_URI`` does not), and every value here is a secret whatever its name.
    """
    from airflow.sdk.log import mask_secret

    for value in values:
        if value:
            mask_secret(value)


def _connection(conn_id: str) -> Any:
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)


def mlflow_credentials(conn_id: str) -> tuple[str, str] | None:
    """``(login, password)`` of an MLflow connection, the password masked; None without a login."""
    conn = _connection(conn_id)
    if not conn.login:
        return None
    mask_values([conn.password or ""])
    return conn.login, conn.password or ""


def _mongo(conn_id: str) -> tuple[str, list[str]]:
    """The connection's URI and the values to mask.

    The mongo provider's URI (password URL-quoted, ``schema`` as the database) plus the
    connection's client options (``authSource``, ``tls``...) as URI options: a job's client
    then connects exactly as Airflow's ``MongoHook`` does.
    """
    from airflow.providers.mongo.hooks.mongo import MongoHook

    hook = MongoHook(mongo_conn_id=conn_id)
    options = {k: str(v).lower() if isinstance(v, bool) else v for k, v in hook.extras.items()
               if isinstance(v, str | int | float | bool)}
    if hook.allow_insecure:
        options["tlsAllowInvalidCertificates"] = "true"
    uri = hook.uri
    if options:
        uri = f"{uri if urlsplit(uri).path else uri + '/'}?{urlencode(options)}"
    password = hook.connection.password or ""
    hidden = [password, quote_plus(password), quote(password, safe="")] if password else []
    return uri, hidden


def mongo_uri(conn_id: str) -> str:
    """A MongoDB connection's URI, password included, with every form of it masked."""
    uri, hidden = _mongo(conn_id)
    mask_values([uri, *hidden])
    return uri


def _registry(conn_id: str) -> RegistryCredentials:
    from slurmflow.hooks.registry import RegistryHook

    return RegistryHook(conn_id).job_credentials()


def gather(refs: SecretRefs | Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None) -> JobSecrets:
    """Resolve ``refs`` (and explicit ``extra`` variables) into the job's :class:`JobSecrets`.

    Nothing is masked yet: call :meth:`JobSecrets.mask` (or use :func:`mask_refs`).

    :param refs: the connections to read.
    :param extra: further secret variables (an operator's ``secret_environment``); their values
        are masked in the process that holds them only, so a trigger cannot mask them again.
    :raises ValueError: a name of ``extra`` is also a connection's variable, or is invalid.
    """
    refs = SecretRefs.from_dict(refs)
    env: dict[str, str] = {}
    hidden: list[str] = []
    if refs.mlflow_conn_id and (creds := mlflow_credentials(refs.mlflow_conn_id)):
        env[MLFLOW_USERNAME], env[MLFLOW_PASSWORD] = creds
    if refs.mongo_conn_id:
        env[MONGO_URI], quoted = _mongo(refs.mongo_conn_id)
        hidden += quoted
    registry = _registry(refs.registry_conn_id) if refs.registry_conn_id else None
    both = sorted(set(env) & set(extra or {}))
    if both:
        raise ValueError(f"secret variables set both by a connection and explicitly: {', '.join(both)}")
    return JobSecrets({**env, **(extra or {})}, registry, tuple(hidden))


def mask_refs(refs: SecretRefs | Mapping[str, Any] | None) -> int:
    """Resolve ``refs`` and mask every value in this process; return how many values.

    For a process that never saw the values, the triggerer above all. Blocking (it reads
    connections): from async code call it as ``await sync_to_async(mask_refs)(refs)``.
    """
    secrets = gather(refs)
    secrets.mask()
    return len(secrets.values())


__all__ = [
    "JOB_SECRET_NAMES",
    "MLFLOW_PASSWORD",
    "MLFLOW_USERNAME",
    "MONGO_URI",
    "JobSecrets",
    "RegistryCredentials",
    "SecretRefs",
    "gather",
    "mask_refs",
    "mask_values",
    "mlflow_credentials",
    "mongo_uri",
]
