"""RegistryHook against a small in-process HTTP API v2 server (Basic and Bearer auth).

The same behaviour is checked against the real docker-registry in
tests/integration/test_image_build.py; this fake covers what the local registry cannot show
(Bearer token services, registries without the digest header) and runs in milliseconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slurmflow.hooks.registry import (
    RegistryAuthError,
    RegistryHook,
    RegistryUnavailableError,
)

USER, PASSWORD = "alice", "pa55-w0rd-XYZ"
MANIFEST = json.dumps({"schemaVersion": 2, "layers": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
TOKEN = "tok-123"


class FakeRegistry(BaseHTTPRequestHandler):
    mode = "basic"  # or "bearer"
    send_digest = True
    requests: list[tuple[str, str, str]] = []

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        if self.mode == "basic":
            good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if header == good:
                return True
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="fake"')
        else:
            if header == f"Bearer {TOKEN}":
                return True
            port = self.server.server_address[1]
            self.send_response(401)
            self.send_header(
                "WWW-Authenticate",
                f'Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:team/app:pull"',
            )
        self.end_headers()
        return False

    def _handle(self, body: bool) -> None:
        FakeRegistry.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
        if self.path.startswith("/token"):
            good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != good:
                self.send_response(401)
                self.end_headers()
                return
            payload = json.dumps({"token": TOKEN}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if not self._authorized():
            return
        if self.path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            if body:
                self.wfile.write(b"{}")
        elif self.path == "/v2/team/app/manifests/v1":
            self.send_response(200)
            if self.send_digest:
                self.send_header("Docker-Content-Digest", DIGEST)
            self.send_header("Content-Length", str(len(MANIFEST)))
            self.end_headers()
            if body:
                self.wfile.write(MANIFEST)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(body=False)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeRegistry.requests = []
    FakeRegistry.mode, FakeRegistry.send_digest = "basic", True
    port = server.server_address[1]

    def conn(
        conn_id: str, password: str = PASSWORD, host: str = f"127.0.0.1:{port}", login: str = USER
    ) -> str:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            json.dumps({"conn_type": "docker", "host": host, "login": login, "password": password}),
        )
        return conn_id

    yield conn
    server.shutdown()


@pytest.mark.parametrize("mode", ["basic", "bearer"])
def test_manifest_digest_with_either_auth_scheme(registry, mode: str) -> None:
    FakeRegistry.mode = mode
    hook = RegistryHook(registry("reg_ok"))
    hook.check()
    assert hook.manifest_digest("team/app", "v1") == DIGEST
    assert hook.manifest_digest("team/app", "missing") is None
    assert any(path.startswith("/token") for _, path, _ in FakeRegistry.requests) == (mode == "bearer")


def test_basic_auth_is_sent_upfront_once_learned(registry) -> None:
    hook = RegistryHook(registry("reg_ok"))
    hook.check()
    before = len(FakeRegistry.requests)
    hook.manifest_digest("team/app", "v1")
    assert len(FakeRegistry.requests) == before + 1  # no 401 round trip any more


def test_digest_computed_from_the_body_when_the_header_is_missing(registry) -> None:
    FakeRegistry.send_digest = False
    assert RegistryHook(registry("reg_ok")).manifest_digest("team/app", "v1") == DIGEST


@pytest.mark.parametrize("mode", ["basic", "bearer"])
def test_wrong_password_is_a_clear_error_without_the_password(
    registry, mode: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    FakeRegistry.mode = mode
    wrong = "Wr0ng-S3cret-Value"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RegistryAuthError) as err:
        RegistryHook(registry("reg_bad", password=wrong)).manifest_digest("team/app", "v1")
    text = str(err.value) + repr(err.value.__cause__) + repr(err.value.__context__)
    assert "rejected the credentials" in text and "reg_bad" in text
    # Airflow's task loggers write to the process streams (structlog), not only to caplog.
    logged = caplog.text + "".join(capfd.readouterr())
    assert wrong not in text and wrong not in logged
    assert base64.b64encode(f"{USER}:{wrong}".encode()).decode() not in logged


def test_registry_down_is_a_clear_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "AIRFLOW_CONN_REG_DOWN",
            json.dumps(
                {"conn_type": "docker", "host": f"127.0.0.1:{port}", "login": "u", "password": "p-123"}
            ),
        )
        with pytest.raises(
            RegistryUnavailableError, match=rf"127.0.0.1:{port} is unreachable.*refused"
        ) as err:
            RegistryHook("reg_down", timeout=2).check()
    assert "p-123" not in str(err.value)


@pytest.mark.parametrize(
    ("host", "extra", "base_url", "registry_name"),
    [
        ("127.0.0.1:5000", {}, "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("localhost", {}, "http://localhost", "localhost"),
        ("registry.example.org", {}, "https://registry.example.org", "registry.example.org"),
        ("https://registry.example.org/", {}, "https://registry.example.org", "registry.example.org"),
        ("registry.lan:5000", {"scheme": "http"}, "http://registry.lan:5000", "registry.lan:5000"),
    ],
)
def test_connection_forms(monkeypatch, host: str, extra: dict, base_url: str, registry_name: str) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_REG_FORM",
        json.dumps({"conn_type": "docker", "host": host, "login": "u", "password": "p", "extra": extra}),
    )
    hook = RegistryHook("reg_form")
    assert hook._settings["base_url"] == base_url
    assert hook.registry == registry_name


def test_job_auth_files_come_from_the_connection(registry) -> None:
    from slurmflow.secrets import SecretRefs, gather

    creds = RegistryHook(registry("reg_ok")).job_credentials()
    assert (creds.username, creds.password) == (USER, PASSWORD) and PASSWORD not in repr(creds)
    files = gather(SecretRefs(registry_conn_id=registry("reg_ok"))).registry_files()
    assert f"CH_IMAGE_PASSWORD={PASSWORD}" in files["registry.env"]
    assert set(files) == {"config.json", "registry.env", ".credentials"}
