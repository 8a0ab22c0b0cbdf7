"""Start-up failures of the local stack give a clear message and start nothing."""

from __future__ import annotations

import socket

import pytest

from scripts.localstack import __main__ as stack
from scripts.localstack.services import Service, services, supervisord_conf


def test_port_taken_names_port_and_service():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        svc = Service("mongo-test", ["/bin/true"], wave=1, port=port, health=lambda: None)
        with pytest.raises(SystemExit) as exc:
            stack.preflight([svc])
    assert f"port {port} is already in use" in str(exc.value.code)
    assert "mongo-test service needs it" in str(exc.value.code)


def test_missing_program_is_named():
    svc = Service("ghost", ["/usr/sbin/no-such-daemon"], wave=1, health=lambda: None)
    with pytest.raises(SystemExit) as exc:
        stack.preflight([svc])
    assert "missing dependencies: /usr/sbin/no-such-daemon" in str(exc.value.code)
    assert "make deps" in str(exc.value.code)


def test_failed_health_check_shows_log_tail(tmp_path, monkeypatch, capsys):
    log = tmp_path / "svc.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "FATAL: could not bind\n")
    monkeypatch.setattr(Service, "log", property(lambda self: log))
    monkeypatch.setitem(stack.HEALTH_TIMEOUT, "flaky", 1)
    svc = Service("flaky", ["/bin/true"], wave=1, health=lambda: "HTTP 503")

    class FakeSupervisor:
        def getProcessInfo(self, name):
            return {"statename": "RUNNING"}

    with pytest.raises(SystemExit) as exc:
        stack.wait_healthy(FakeSupervisor(), svc)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "flaky did not become healthy: HTTP 503" in err
    assert "FATAL: could not bind" in err and "line 99" in err and "line 10\n" not in err


def test_every_service_is_supervised_and_loopback_only():
    svcs = services("local")  # the CeleryExecutor's stack: test_localstack_celery.py
    conf = supervisord_conf(svcs)
    assert conf.count("[program:") == len(svcs) == 16
    assert "autostart=false" in conf
    for svc in svcs:
        assert "0.0.0.0" not in " ".join(svc.command)
    # Secrets reach daemons through files or the environment, never their argv.
    from scripts.localstack.config import load_secrets

    argv = " ".join(" ".join(s.command) for s in svcs)
    leaked = [k for k, v in load_secrets().items() if v in argv]
    assert leaked == []
