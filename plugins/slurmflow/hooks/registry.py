"""The image registry over its HTTP API v2: does a tag exist, and under which manifest digest.

Credentials come from an Airflow connection of type ``docker`` (host = ``registry[:port]``,
login, password; extra ``{"scheme": "http"|"https"}``, default https except on loopback). They
are sent only in ``Authorization`` headers: never in a URL, a log line or an exception message.
Both auth schemes registries use are handled: ``Basic`` (htpasswd, as distribution's) and
``Bearer`` tokens from the realm the ``WWW-Authenticate`` challenge names (Docker Hub, GHCR,
Harbor, GitLab...).
"""

from __future__ import annotations

import hashlib
import ipaddress
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import requests
from airflow.providers.common.compat.sdk import AirflowException, BaseHook
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from slurmflow.secrets import RegistryCredentials

#: Every manifest kind a build or a multi-arch base may produce; the registry answers with the
#: digest of the stored one, which is what ``image@digest`` must name.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


class RegistryError(AirflowException):
    """The registry answered something we cannot use (a 5xx, a malformed reply)."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached: connection refused, DNS, TLS, timeout."""


class RegistryAuthError(RegistryError):
    """The registry refused the connection's credentials (or demanded some and we have none)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="...",service="...",scope="..."`` into the scheme and its params."""
    scheme, _, rest = header.strip().partition(" ")
    params = dict(requests.utils.parse_dict_header(rest)) if rest else {}
    return scheme.lower(), {k: v for k, v in params.items() if v is not None}


class RegistryHook(BaseHook):
    """Read-only client of a registry's HTTP API v2.

    :param registry_conn_id: Airflow connection (type ``docker``) of the registry.
    :param timeout: seconds for each HTTP request (connect and read).
    """

    conn_name_attr = "registry_conn_id"
    default_conn_name = "registry_default"
    conn_type = "docker"
    hook_name = "Image registry (HTTP API v2)"

    def __init__(self, registry_conn_id: str = default_conn_name, *, timeout: float = 10.0) -> None:
        super().__init__()
        self.registry_conn_id = registry_conn_id
        self.timeout = timeout
        self._tokens: dict[str, str] = {}  # bearer token per scope, for this hook's lifetime
        self._basic = False  # the registry asked for Basic once: send it upfront from then on

    # --- connection ---------------------------------------------------------------------------
    @cached_property
    def _settings(self) -> dict[str, Any]:
        conn = self.get_connection(self.registry_conn_id)
        host = (conn.host or "").strip()
        if not host:
            raise RegistryError(f"connection {self.registry_conn_id!r} has no host (the registry address)")
        extra = conn.extra_dejson
        scheme = extra.get("scheme")
        if "://" in host:  # tolerate "https://registry.example.org" in the host field
            parts = urlsplit(host)
            scheme, host = scheme or parts.scheme, parts.netloc
        host = host.rstrip("/")
        if conn.port and ":" not in host.rsplit("]", 1)[-1]:
            host = f"{host}:{conn.port}"
        hostname = urlsplit(f"//{host}").hostname or host
        scheme = scheme or ("http" if _is_loopback(hostname) else "https")
        if scheme not in ("http", "https"):
            raise RegistryError(f"connection {self.registry_conn_id!r}: scheme must be http or https")
        return {
            "registry": host,
            "base_url": f"{scheme}://{host}",
            "username": conn.login or None,
            "password": conn.password or None,
            "verify": extra.get("verify", True),
        }

    @property
    def registry(self) -> str:
        """``host[:port]`` as it appears in image references."""
        return self._settings["registry"]

    @cached_property
    def session(self) -> requests.Session:
        session = requests.Session()
        # Short retries for blips only: a registry that is down must fail the task quickly and clearly.
        retry = Retry(
            total=2,
            connect=2,
            read=1,
            status=2,
            backoff_factor=0.3,
            status_forcelist=(502, 503, 504),
            allowed_methods=("GET", "HEAD"),
            raise_on_status=False,
        )
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        session.verify = self._settings["verify"]
        session.headers["User-Agent"] = "slurmflow-registry-hook"
        return session

    def docker_auth_config(self) -> dict[str, str] | None:
        """``auth_config`` for docker-py's push/pull (None without credentials)."""
        s = self._settings
        if not s["username"]:
            return None
        return {"username": s["username"], "password": s["password"] or "", "serveraddress": s["registry"]}

    def job_credentials(self) -> RegistryCredentials:
        """The login jobs pull with; :mod:`slurmflow.secrets` masks it and renders the job's
        ``auth_dir`` files from it (``JobSecrets.registry_files``).

        :raises RegistryError: when the connection has no credentials.
        """
        s = self._settings
        if not s["username"] or not s["password"]:
            raise RegistryError(f"connection {self.registry_conn_id!r} has no login/password to hand to jobs")
        return RegistryCredentials(s["registry"], s["username"], s["password"])

    # --- HTTP with auth -----------------------------------------------------------------------
    def _request(
        self, method: str, path: str, *, scope: str | None = None, **kwargs: Any
    ) -> requests.Response:
        url = f"{self._settings['base_url']}/v2/{path}"
        headers = dict(kwargs.pop("headers", {}))
        s = self._settings
        if scope and scope in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        elif self._basic and s["username"]:
            kwargs["auth"] = (s["username"], s["password"] or "")
        resp = self._send(method, url, headers=headers, **kwargs)
        if resp.status_code in (401, 403) and "auth" in kwargs:
            raise RegistryAuthError(self._auth_message("rejected the credentials"))
        if resp.status_code != 401:
            return resp
        scheme, params = _parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not s["username"]:
                raise RegistryAuthError(
                    self._auth_message("requires credentials and the connection has none")
                )
            self._basic = True
            resp = self._send(
                method, url, headers=headers, auth=(s["username"], s["password"] or ""), **kwargs
            )
        elif scheme == "bearer" and params.get("realm"):
            token = self._bearer_token(params, scope)
            headers["Authorization"] = f"Bearer {token}"
            resp = self._send(method, url, headers=headers, **kwargs)
        else:
            raise RegistryAuthError(self._auth_message("asked for an unsupported authentication scheme"))
        if resp.status_code in (401, 403):
            raise RegistryAuthError(self._auth_message("rejected the credentials"))
        return resp

    def _bearer_token(self, params: dict[str, str], scope: str | None) -> str:
        s = self._settings
        query = {"service": params.get("service", "")}
        if params.get("scope") or scope:
            query["scope"] = params.get("scope") or scope or ""
        auth = (s["username"], s["password"] or "") if s["username"] else None
        resp = self._send("GET", params["realm"], params=query, auth=auth)
        if resp.status_code in (401, 403):
            raise RegistryAuthError(self._auth_message("rejected the credentials at its token service"))
        if resp.status_code != 200:
            raise RegistryError(f"registry {s['registry']}: token service answered HTTP {resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body["access_token"]
        except (ValueError, KeyError):
            raise RegistryError(f"registry {s['registry']}: token service sent no token") from None
        if scope:
            self._tokens[scope] = token
        return token

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, allow_redirects=True, **kwargs)
        except requests.exceptions.SSLError:
            raise RegistryUnavailableError(
                f"registry {self.registry}: TLS handshake failed at {urlsplit(url).netloc} "
                '(plain-HTTP registry? set extra {"scheme": "http"} on the connection)'
            ) from None
        except requests.exceptions.RequestException as exc:
            # `from None`: the chained urllib3 error adds nothing and is one more place to audit.
            raise RegistryUnavailableError(
                f"registry {self.registry} is unreachable ({self._settings['base_url']}): "
                f"{type(exc).__name__}: {self._reason(exc)}"
            ) from None

    @staticmethod
    def _reason(exc: Exception) -> str:
        text = str(exc)
        for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
            if marker in text:
                return marker
        return text.split("(Caused by", 1)[0].strip()[:200]

    def _auth_message(self, what: str) -> str:
        user = self._settings["username"]
        who = f" (login {user!r})" if user else ""
        return f"registry {self.registry} {what}: connection {self.registry_conn_id!r}{who}"

    # --- API ----------------------------------------------------------------------------------
    def check(self) -> None:
        """``GET /v2/`` with auth: proves the registry is up and takes our credentials.

        :raises RegistryUnavailableError: unreachable. :raises RegistryAuthError: bad credentials.
        """
        resp = self._request("GET", "")
        if resp.status_code != 200:
            raise RegistryError(f"registry {self.registry}: GET /v2/ answered HTTP {resp.status_code}")

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """Digest of ``repository:reference`` (``HEAD /v2/<repo>/manifests/<ref>``), None if absent.

        :param repository: path in the registry, e.g. ``slurmflow/training``.
        :param reference: a tag or a ``sha256:`` digest.
        """
        scope = f"repository:{repository}:pull"
        resp = self._request(
            "HEAD", f"{repository}/manifests/{reference}", scope=scope, headers={"Accept": MANIFEST_ACCEPT}
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise RegistryError(
                f"registry {self.registry}: HEAD manifest {repository}:{reference} answered HTTP {resp.status_code}"
            )
        digest = resp.headers.get("Docker-Content-Digest")
        if not digest:
            # Registries that omit the header on HEAD (rare) still send it, or the body, on GET.
            resp = self._request(
                "GET", f"{repository}/manifests/{reference}", scope=scope, headers={"Accept": MANIFEST_ACCEPT}
            )
            digest = resp.headers.get("Docker-Content-Digest")
            if not digest and resp.status_code == 200:
                digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        if not digest:
            raise RegistryError(f"registry {self.registry}: no digest for {repository}:{reference}")
        return digest
