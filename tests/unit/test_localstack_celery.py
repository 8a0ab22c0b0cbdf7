"""`make up EXECUTOR=celery`: the same stack on the CeleryExecutor; plain `make up` as before."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from scripts.localstack import __main__ as stack
from scripts.localstack import config, rpc
from scripts.localstack import services as services_mod
from scripts.localstack.services import heartbeat_shortfall, services, supervisord_conf

LOCAL_PROGRAMS = [
    "postgres", "mariadb", "munged", "sshd", "dockerd", "registry", "mongo", "slurmdbd", "mlflow", "slurmctld",
    "slurmd", "slurmd-local2", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
]


def _airflow_programs(svcs):
    return [s for s in svcs if s.name.startswith("airflow-")]


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_local_stack_is_unchanged():
    svcs = services("local")
    assert [s.name for s in svcs] == LOCAL_PROGRAMS
    triggerer = next(s for s in svcs if s.name == "airflow-triggerer")
    assert triggerer.command[1:] == ["triggerer"]
    for svc in _airflow_programs(svcs):
        assert svc.env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert not [k for k in svc.env if k.startswith("AIRFLOW__CELERY__")]


def test_celery_stack_adds_broker_two_workers_and_a_second_triggerer():
    svcs = services("celery")
    by_name = {s.name: s for s in svcs}
    assert set(by_name) == {*LOCAL_PROGRAMS, "redis", "airflow-worker-1", "airflow-worker-2", "airflow-triggerer-2"}
    assert [s.wave for s in svcs] == sorted(s.wave for s in svcs)  # start order
    redis = by_name["redis"]
    assert (redis.wave, redis.port, redis.user) == (1, config.REDIS_PORT, "redis") and redis.port != 6379
    assert redis.command == ["/usr/bin/redis-server", str(config.STACK / "redis" / "redis.conf")]

    workers = [by_name["airflow-worker-1"], by_name["airflow-worker-2"]]
    hostnames = [_arg(w.command, "--celery-hostname") for w in workers]
    assert len(set(hostnames)) == 2 and all(h.startswith(f"worker-{i}@") for i, h in enumerate(hostnames, 1))
    for w in workers:
        assert w.command[1:3] == ["celery", "worker"] and w.wave == 5
        assert _arg(w.command, "--concurrency") == "4"
    # One log server per port on one machine: the second worker and triggerer leave it to the first.
    assert "--skip-serve-logs" not in workers[0].command and "--skip-serve-logs" in workers[1].command
    assert by_name["airflow-triggerer"].command[1:] == ["triggerer"]
    assert by_name["airflow-triggerer-2"].command[1:] == ["triggerer", "--skip-serve-logs"]
    assert by_name["airflow-triggerer-2"].wave == 5


def test_celery_executor_env_is_the_same_for_every_airflow_program():
    secrets = config.load_secrets()
    envs = [s.env for s in _airflow_programs(services("celery"))]
    assert len(envs) == 7 and all(env == envs[0] for env in envs)
    env = envs[0]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == (
        f"redis://:{secrets['REDIS_PASSWORD']}@127.0.0.1:{config.REDIS_PORT}/0")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://airflow:")


def test_celery_stack_is_supervised_loopback_only_and_no_secret_on_argv():
    svcs = services("celery")
    conf = supervisord_conf(svcs)
    assert conf.count("[program:") == len(svcs) == 20
    argv = " ".join(" ".join(s.command) for s in svcs)
    assert "0.0.0.0" not in argv
    leaked = [k for k, v in config.load_secrets().items() if v in argv]
    assert leaked == []
    # In the supervisord configuration (mode 600) secrets are only in the programs' environment.
    commands = "\n".join(line for line in conf.splitlines() if line.startswith("command="))
    assert not [k for k, v in config.load_secrets().items() if v in commands]


def test_redis_config_is_private_loopback_and_password_protected(tmp_path):
    dest = tmp_path / "redis.conf"
    config.render("redis.conf", dest, mode=0o600)
    assert dest.stat().st_mode & 0o777 == 0o600
    lines = dest.read_text().splitlines()
    assert "bind 127.0.0.1" in lines and f"port {config.REDIS_PORT}" in lines
    assert "protected-mode yes" in lines and "daemonize no" in lines
    assert f"requirepass {config.load_secrets()['REDIS_PASSWORD']}" in lines
    # `make down` recognises a leftover Redis of this stack by its config path in the process title.
    assert any(line.startswith("proc-title-template") and "{config-file}" in line for line in lines)


def test_executor_is_remembered_for_status_down_and_tools(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "EXECUTOR_FILE", tmp_path / "executor")
    assert config.stack_executor() == "local"  # never chosen: today's stack
    assert "airflow-worker-1" not in {s.name for s in services()}
    config.remember_executor("celery")
    assert config.stack_executor() == "celery"
    assert {"redis", "airflow-worker-1", "airflow-worker-2", "airflow-triggerer-2"} <= {s.name for s in services()}
    assert config.airflow_env()["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    config.remember_executor("local")
    assert config.airflow_env()["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    with pytest.raises(SystemExit, match="unknown executor 'kubernetes': choose one of local, celery"):
        config.remember_executor("kubernetes")
    (tmp_path / "executor").write_text("garbage\n")
    assert config.stack_executor() == "local"


@pytest.mark.parametrize(("argv", "executor"), [(["up"], "local"), (["up", "--executor", "celery"], "celery"),
                                                (["up", "--executor", "local"], "local")])
def test_up_takes_the_executor_from_the_command_line(monkeypatch, argv, executor):
    chosen = []
    monkeypatch.setattr(stack, "up", chosen.append)
    monkeypatch.setattr(sys, "argv", ["localstack", *argv])
    stack.main()
    assert chosen == [executor]


def test_up_refuses_an_unknown_executor(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["localstack", "up", "--executor", "kubernetes"])
    with pytest.raises(SystemExit):
        stack.main()
    assert "invalid choice: 'kubernetes'" in capsys.readouterr().err


def test_switching_executor_stops_and_removes_the_other_executors_programs(tmp_path):
    """A real supervisord: a program gone from the configuration stops and goes, a changed one is
    replaced (stopped; `make up` starts it in its wave), an unchanged one keeps running."""
    sock = tmp_path / "supervisor.sock"

    def write_conf(programs: dict[str, str]) -> None:
        lines = ["[unix_http_server]", f"file={sock}", "chmod=0700", "[supervisord]",
                 f"logfile={tmp_path / 'supervisord.log'}", f"pidfile={tmp_path / 'supervisord.pid'}",
                 "[rpcinterface:supervisor]",
                 "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface"]
        for name, env in programs.items():
            lines += [f"[program:{name}]", "command=sleep 300", "autostart=false", "startsecs=0",
                      "stopasgroup=true", "killasgroup=true", f"environment={env}"]
        (tmp_path / "supervisord.conf").write_text("\n".join(lines) + "\n")

    write_conf({"airflow-scheduler": 'AIRFLOW__CORE__EXECUTOR="CeleryExecutor"', "airflow-worker-1": 'X="1"',
                "mongo": 'X="1"'})
    subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(tmp_path / "supervisord.conf")],
                   check=True)
    try:
        for _ in range(50):
            sup = rpc.running_supervisor(sock)
            if sup:
                break
            time.sleep(0.1)
        for name in ("airflow-scheduler", "airflow-worker-1", "mongo"):
            sup.startProcess(name, True)
        pids = {p["name"]: p["pid"] for p in sup.getAllProcessInfo()}
        write_conf({"airflow-scheduler": 'AIRFLOW__CORE__EXECUTOR="LocalExecutor"', "mongo": 'X="1"'})
        stack.update_programs(sup)
        after = {p["name"]: p for p in sup.getAllProcessInfo()}
        assert set(after) == {"airflow-scheduler", "mongo"}
        assert after["airflow-scheduler"]["statename"] == "STOPPED"
        assert after["mongo"]["statename"] == "RUNNING" and after["mongo"]["pid"] == pids["mongo"]
        for name in ("airflow-worker-1", "airflow-scheduler"):
            with pytest.raises(ProcessLookupError):
                os.kill(pids[name], 0)
    finally:
        sup = rpc.running_supervisor(sock)
        if sup:
            sup.stopAllProcesses(True)
            sup.shutdown()


def test_heartbeat_shortfall_counts_only_jobs_started_after_their_process():
    assert heartbeat_shortfall([], []) == 0
    assert heartbeat_shortfall([100, 101], [105, 106]) == 0
    assert heartbeat_shortfall([100, 101], [105]) == 1
    assert heartbeat_shortfall([100, 101], []) == 2
    # triggerer-2 was killed and restarted at 200: the old job (150) still looks alive a while.
    assert heartbeat_shortfall([100, 200], [105, 150]) == 1
    assert heartbeat_shortfall([100, 200], [105, 150, 205]) == 0
    # a job started after both may stand for either, but not for both
    assert heartbeat_shortfall([100, 200], [205]) == 1


class _FakeSupervisor:
    def __init__(self, starts: dict[str, int]) -> None:
        self.starts = starts

    def getAllProcessInfo(self):  # noqa: N802  (supervisord's XML-RPC name)
        return [{"name": n, "statename": "RUNNING", "start": s} for n, s in self.starts.items()] + [
            {"name": "airflow-scheduler", "statename": "RUNNING", "start": 1}]


def _fake_api(jobs: list[float] | Exception):
    class FakeAPI:
        def __init__(self, url, user, password):
            assert url == "http://127.0.0.1:8080"

        def get(self, path):
            assert path.startswith("/jobs?job_type=TriggererJob&job_state=running&is_alive=true")
            if isinstance(jobs, Exception):
                raise jobs
            iso = [datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") for t in jobs]
            return {"jobs": [{"start_date": d} for d in iso], "total_entries": len(iso)}

    return FakeAPI


def test_triggerer_health_wants_a_live_heartbeat_per_running_triggerer(monkeypatch):
    by_name = {s.name: s for s in services("celery")}
    monkeypatch.setattr(services_mod, "running_supervisor",
                        lambda: _FakeSupervisor({"airflow-triggerer": 1000, "airflow-triggerer-2": 1001}))
    monkeypatch.setattr(services_mod, "AirflowAPI", _fake_api([1004.5, 1005.25]))
    assert by_name["airflow-triggerer"].health() is None and by_name["airflow-triggerer-2"].health() is None
    monkeypatch.setattr(services_mod, "AirflowAPI", _fake_api([1004.5]))
    assert by_name["airflow-triggerer-2"].health() == "1 of 2 triggerers without a live heartbeat of their own"
    monkeypatch.setattr(services_mod, "AirflowAPI", _fake_api(ConnectionRefusedError(111, "Connection refused")))
    assert by_name["airflow-triggerer"].health() == "api-server: [Errno 111] Connection refused"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_broker_down_is_reported_at_once_without_the_password(monkeypatch):
    port = _closed_port()
    monkeypatch.setattr(services_mod, "REDIS_PORT", port)
    monkeypatch.setattr(services_mod, "celery_broker_url", lambda: f"redis://:hunter2-secret@127.0.0.1:{port}/0")
    svcs = {s.name: s for s in services("celery")}
    t0 = time.monotonic()
    reason = svcs["airflow-worker-1"].health()
    assert time.monotonic() - t0 < 10
    assert reason.startswith(f"broker 127.0.0.1:{port}: ") and "hunter2" not in reason
    assert svcs["redis"].health()  # redis-cli: refused, or no redis-cli at all
