"""MlflowHook's client: MLflow's own request retries see a server that is back within a minute."""

from __future__ import annotations

from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

from slurmflow.hooks.mlflow import BACKOFF_ENV, MlflowHook


def test_mlflow_retries_with_a_backoff_gap_of_at_most_64_s_once_a_hook_exists(monkeypatch):
    """Regression (make chaos, stop-mlflow at register): with MLflow's default factor 2 register
    saw the server 165 s after it was back; with factor 1 its retries are 1-64 s apart. Set when
    the hook is made: the offline replay's own clients (inside ``credentials()``) ask first."""
    monkeypatch.delenv(BACKOFF_ENV, raising=False)
    MlflowHook()
    factor, retries = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    assert factor * 2 ** (retries - 1) <= 64


def test_a_site_setting_wins(monkeypatch):
    monkeypatch.setenv(BACKOFF_ENV, "3")
    MlflowHook()
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 3
