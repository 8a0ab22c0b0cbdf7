"""Airflow connections to the real local stack, as environment variables (no metadata DB needed)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def stack_connections(stack_env, monkeypatch):
    """Point ``slurm_default``, ``registry_default``, ``mlflow_default`` and ``mongo_default`` at the stack."""
    conns = {
        "slurm_default": {"conn_type": "ssh", "host": stack_env["SSH_HOST"], "port": int(stack_env["SSH_PORT"]),
                          "login": stack_env["SSH_USER"],
                          "extra": {"key_file": stack_env["SSH_KEY"], "no_host_key_check": True}},
        "registry_default": {"conn_type": "docker", "host": stack_env["REGISTRY"],
                             "login": stack_env["REGISTRY_USER"], "password": stack_env["REGISTRY_PASSWORD"]},
        "mlflow_default": {"conn_type": "http", "host": "127.0.0.1", "port": 5001, "schema": "http",
                           "login": stack_env["MLFLOW_TRACKING_USERNAME"],
                           "password": stack_env["MLFLOW_TRACKING_PASSWORD"]},
        "mongo_default": {"conn_type": "mongo", "host": "127.0.0.1", "port": 27017, "schema": "slurmflow_test",
                          "extra": {"srv": False, "ssl": False}},
    }
    for conn_id, conn in conns.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conns
