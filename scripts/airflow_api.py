"""A small client for Airflow 3's REST API (``/api/v2``), used by ``make demo`` and the e2e tests.

Authentication: ``POST /auth/token`` with the user's credentials gives a JWT for the
``Authorization: Bearer`` header (Airflow 3's simple auth manager and FAB both serve it).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class AirflowAPIError(RuntimeError):
    """An HTTP error from the API, with its status and Airflow's ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class AirflowAPI:
    """:param url: base URL, e.g. ``http://127.0.0.1:8080``; :param user: / :param password: login."""

    def __init__(self, url: str, user: str, password: str) -> None:
        self.url = url.rstrip("/")
        self._login = {"username": user, "password": password}
        self._token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                detail = json.loads(text).get("detail", text)
            except ValueError:
                detail = text
            raise AirflowAPIError(exc.code, detail) from None
        return json.loads(raw) if raw else None

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self._request("POST", "/auth/token", self._login, auth=False)["access_token"]
        return self._token

    def get(self, path: str) -> Any:
        return self._request("GET", f"/api/v2{path}")

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", f"/api/v2{path}", body)

    def patch(self, path: str, body: Any) -> Any:
        return self._request("PATCH", f"/api/v2{path}", body)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", f"/api/v2{path}")

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> dict:
        """Wait until the dag-processor has parsed ``dag_id``; unpause it; return it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                dag = self.get(f"/dags/{dag_id}")
                break
            except AirflowAPIError as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        if dag.get("is_paused"):
            dag = self.patch(f"/dags/{dag_id}", {"is_paused": False})
        return dag

    def trigger(self, dag_id: str, conf: dict | None = None, run_id: str | None = None,
                logical_date: str | None = None) -> dict:
        """Trigger a run; Params in ``conf`` are validated by Airflow (HTTP 400 when invalid)."""
        body: dict[str, Any] = {"conf": conf or {}, "logical_date": logical_date}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post(f"/dags/{dag_id}/dagRuns", body)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900, poll: float = 3) -> dict:
        """Wait until the run is ``success`` or ``failed``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in {"success", "failed"}:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f} s")
            time.sleep(poll)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}?map_index={map_index}"
        return self.get(path)["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int | None = None) -> str:
        """The task's log as text (the latest try unless ``try_number``), as the UI shows it."""
        if try_number is None:
            ti = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
            try_number = int(ti["try_number"])
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}?full_content=true")
        content = body.get("content", "") if isinstance(body, dict) else body
        if isinstance(content, list):  # structured log lines (Airflow 3)
            return "\n".join(_log_line(c) for c in content)
        return str(content)


def _log_line(line: Any) -> str:
    """One structured log line as text; an exception's type and message follow, as the UI shows them."""
    if not isinstance(line, dict):
        return str(line)
    errors = [f"{e.get('exc_type')}: {e.get('exc_value')}" for e in line.get("error_detail") or ()
              if isinstance(e, dict)]
    return "\n".join([str(line.get("event", line)), *errors])
