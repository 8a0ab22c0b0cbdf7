"""``make demo``: trigger train_model on the local stack through Airflow's REST API and report.

Runs after ``make up``: waits for the DAG to be parsed, triggers it with its defaults, waits for
the run, then prints the outcome, the metrics, the registered model version and where to look.
"""

from __future__ import annotations

import sys
import time

from scripts.airflow_api import AirflowAPI
from scripts.localstack.config import stack_env


def main() -> int:
    env = stack_env()
    api = AirflowAPI(env["AIRFLOW_URL"], env["AIRFLOW_USER"], env["AIRFLOW_PASSWORD"])
    api.wait_for_dag("train_model")
    t0 = time.monotonic()
    run = api.trigger("train_model", conf={})
    run_id = run["dag_run_id"]
    print(f"triggered train_model run {run_id}; waiting (image, queue, training, registration)...")
    run = api.wait_for_run("train_model", run_id, timeout=1500)
    wall = time.monotonic() - t0
    print(f"\ntrain_model {run_id}: {run['state'].upper()} in {wall:.0f} s")
    for ti in api.task_instances("train_model", run_id):
        duration = ti.get("duration") or 0
        print(f"  {ti['task_id']:<12} {ti['state'] or '-':<16} {duration:6.1f} s")
    base = env["AIRFLOW_URL"]
    print(f"\nAirflow UI:  {base}/dags/train_model/runs/{run_id}   (login admin / admin, dev only)")
    if run["state"] != "success":
        print("the run failed: open the failed task's log in the Airflow UI (the job's log tail is there)")
        return 1
    reg = api.xcom("train_model", run_id, "register")
    job = api.xcom("train_model", run_id, "train")
    print(f"Slurm job:   {job['job_id']} {job['state']} on {job.get('node_list')} in {job.get('elapsed')}; "
          f"job dir {job['job_dir']}")
    print("metrics:     " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(reg["metrics"].items())))
    print(f"model:       {reg['model_name']} version {reg['model_version']}")
    print(f"MLflow run:  {reg['run_url']}")
    print(f"MLflow model:{reg['model_url']}   (user admin, password in .stack/stack.env)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
