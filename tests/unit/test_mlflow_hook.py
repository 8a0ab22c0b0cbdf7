"""MlflowHook's client: MLflow's own request retries see a server that is back within a minute."""

from __future__ import annotations

from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

from slurmflow.hooks.mlflow import BACKOFF_ENV, MlflowHook


def hook() -> MlflowHook:
    h = MlflowHook()
    h.__dict__.update(tracking_uri="http://127.0.0.1:1", _creds=None)  # no connection lookup
    return h


def test_the_client_retries_with_a_backoff_gap_of_at_most_64_s(monkeypatch):
    """Regression (make chaos, stop-mlflow at register): with MLflow's default factor 2 register
    saw the server 165 s after it was back; with factor 1 its retries are 1-64 s apart."""
    monkeypatch.delenv(BACKOFF_ENV, raising=False)
    assert hook().client is not None
    factor, retries = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    assert factor * 2 ** (retries - 1) <= 64


def test_a_site_setting_wins(monkeypatch):
    monkeypatch.setenv(BACKOFF_ENV, "3")
    assert hook().client is not None
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 3
