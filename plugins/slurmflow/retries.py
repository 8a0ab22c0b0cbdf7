"""How a task rides out a restart of a service it calls: the registry (build_image), MLflow
(register, evaluate_and_promote) and MongoDB (catalog).

The hooks fail fast and clearly on a service that is down; Airflow then retries the task 15, 30,
60 and 120 s later (about 4 minutes in all) instead of a DAG's one retry. Every such task is
idempotent by its run key, so a retry finishes the work rather than repeating it. Passed
explicitly to each task, because a DAG's ``default_args`` would win over an operator's defaults.
Found by ``make chaos``: a 43 s registry outage failed a run after its one retry.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

SERVICE_RETRIES: dict[str, Any] = {
    "retries": 4,
    "retry_delay": timedelta(seconds=15),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=2),
}
