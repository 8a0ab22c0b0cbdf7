"""The Trigger form, the task log and the MLflow link, in headless Chromium, as a user uses them.

What the REST API accepted, the form once refused (required-looking empty fields, Trigger
disabled): these tests press the buttons a person presses.
"""

from __future__ import annotations

import re
import uuid

import pytest

from slurmflow.pipeline.params import INIT_FROM, SLURM_BIND, SLURM_NAME
from tests.ui.airflow_ui import wait_for
from tests.ui.conftest import save_page

pytestmark = pytest.mark.e2e  # a real browser on the real stack: not part of `make test-unit`

DAGS = ("train_model", "nightly_retrain", "hparam_sweep")


@pytest.mark.parametrize("dag_id", DAGS)
def test_trigger_form_is_submittable_with_its_defaults(ui, api, dag_id):
    api.wait_for_dag(dag_id)
    ui.open_trigger_form(dag_id)
    assert ui.sections_in_error() == []
    assert ui.invalid_fields() == []
    assert ui.submit_button().get_attribute("disabled") is None, "Trigger is disabled with the defaults"
    # optional values render as empty, not as required fields in error
    for name in ("model_name", "partition", "account", "qos"):
        ui.reveal(name)
        assert ui.field(name).get_attribute("value") == ""
        assert ui.field(name).get_attribute("required") is None, f"{name} is shown as required"
    # enums are dropdowns (react-select keeps the value in a hidden input), objects are JSON editors
    assert ui.field("task").get_attribute("type") == "hidden"
    assert ui.field("container_runtime").get_attribute("value") == "__null__"
    ui.reveal("data_query")
    assert '"valid": true' in ui.json_editor_text("data_query")
    save_page(ui, f"form-{dag_id}")


def test_online_training_form_takes_its_defaults_and_keeps_the_ensemble_in_bounds(ui, api):
    """online_training's own fields: the defaults submit; an ensemble of 1-rank replicas (fewer than
    two classes) or beyond the schema's maximum cannot even be typed (the REST API answers 400 for
    them: tests/e2e/test_online_training.py), and nothing is triggered."""
    api.wait_for_dag("online_training")
    before = api.get("/dags/online_training/dagRuns?limit=1")["total_entries"]
    ui.open_trigger_form("online_training")
    assert ui.sections_in_error() == [] and ui.invalid_fields() == []
    assert ui.submit_button().get_attribute("disabled") is None, "Trigger is disabled with the defaults"
    for name, value in (("ranks_per_replica", "2"), ("replicas", "2"), ("trainer_ranks", "1")):
        ui.reveal(name)
        assert ui.field(name).get_attribute("value") == value
    # number fields hold to the schema's bounds: a value outside them is clamped as the field is left
    for name, typed, kept in (("ranks_per_replica", "1", "2"), ("replicas", "100000", "256")):
        ui.reveal(name)
        ui.type_into(name, typed)
        assert ui.field(name).get_attribute("value") == kept, f"{name}={typed} was not clamped to {kept}"
    assert ui.sections_in_error() == [] and ui.invalid_fields() == []
    save_page(ui, "form-online_training-clamped")
    assert api.get("/dags/online_training/dagRuns?limit=1")["total_entries"] == before


def test_sweep_form_in_backfill_mode_keeps_its_params_valid(ui, api):
    api.wait_for_dag("hparam_sweep")
    ui.open_trigger_form("hparam_sweep")
    ui.choose_mode("backfill")
    assert ui.sections_in_error() == [] and ui.invalid_fields() == []
    ui.reveal("search_space")
    editor = ui.json_editor_text("search_space")
    assert '"lr"' in editor and '"width"' in editor, editor
    # Run Backfill waits for a date range only, not for any Param
    assert ui.submit_button("Run Backfill").get_attribute("disabled") is not None
    ui.set_backfill_range("2026/01/02", "2026/01/03")
    wait_for(lambda: ui.submit_button("Run Backfill").get_attribute("disabled") is None, 20,
             "Run Backfill to be enabled once the date range is set")
    assert "2 runs will be triggered" in ui.dialog().text  # Airflow's own dry run of the range
    assert ui.sections_in_error() == [] and ui.invalid_fields() == []
    save_page(ui, "form-hparam_sweep-backfill")


def test_an_emptied_required_field_disables_trigger_with_the_reason(ui, api):
    api.wait_for_dag("train_model")
    ui.open_trigger_form("train_model")
    ui.reveal("data_collection")
    ui.type_into("data_collection", "")
    wait_for(lambda: ui.submit_button().get_attribute("disabled") is not None, 10, "Trigger to be disabled")
    assert "required" in ui.field_error("data_collection").lower()
    assert "Data" in ui.sections_in_error()
    save_page(ui, "form-required-field-emptied")


@pytest.mark.parametrize("param, value, pattern", [
    ("partition", "debug; touch /tmp/pwned", SLURM_NAME),
    ("cpu_bind", "cores $(reboot)", SLURM_BIND),  # a resource shape of the DeepCam seed
    ("init_from", "models:/mine/latest`id`", INIT_FROM),  # continue a previous experiment
])
def test_a_value_the_schema_refuses_shows_the_reason_in_the_form_and_creates_no_run(ui, api, param, value, pattern):
    api.wait_for_dag("train_model")
    before = api.get("/dags/train_model/dagRuns?limit=1")["total_entries"]
    ui.open_trigger_form("train_model")
    ui.reveal(param)
    ui.type_into(param, value)
    ui.click(ui.submit_button())
    message = wait_for(lambda: "does not match" in ui.dialog().text and ui.dialog().text, 30,
                       "the server's validation message in the dialog")
    assert param in message and pattern in message
    save_page(ui, f"form-pattern-refused-{param}")
    assert api.get("/dags/train_model/dagRuns?limit=1")["total_entries"] == before


def test_train_from_the_form_then_read_the_job_log_and_follow_the_mlflow_link(ui, api, stack_env):
    """The design's first promise: pick values in the form, press Trigger, watch the Slurm job's
    log in the task log, open the registered run in MLflow."""
    api.wait_for_dag("train_model")
    model = f"ui-train-{uuid.uuid4().hex[:6]}"
    ui.open_trigger_form("train_model")
    ui.reveal("model_name")
    ui.type_into("model_name", model)
    ui.click(ui.submit_button())
    # The UI navigates to the new run's page.
    run_id = wait_for(ui.run_id_from_url, 60, "the new run's page")
    run = api.wait_for_run("train_model", run_id, timeout=900)
    assert run["state"] == "success", api.task_instances("train_model", run_id)
    assert run["conf"]["model_name"] == model
    job = api.xcom("train_model", run_id, "train")

    # The train task's log page shows the Slurm job's own lines, streamed by the trigger.
    ui.open_task_log("train_model", run_id, "train")
    text = wait_for(lambda: (t := ui.log_text()) and f"[slurm {job['job_id']}]" in t and t, 60,
                    "the Slurm job's lines in the task log")
    assert "training complete" in text
    save_page(ui, "task-log-train")

    # The register task's "MLflow run" extra link opens the run in MLflow's own UI.
    reg = api.xcom("train_model", run_id, "register")
    ui.open(f"/dags/train_model/runs/{run_id}/tasks/register/details")  # the task's Details tab
    href = ui.extra_link("MLflow run")
    assert href == reg["run_url"]
    with ui.basic_auth(stack_env["MLFLOW_TRACKING_USERNAME"], stack_env["MLFLOW_TRACKING_PASSWORD"]):
        ui.driver.get(href)
        tag = re.compile(rf"slurm\.job_id\W+{job['job_id']}\b")
        wait_for(lambda: reg["run_id"] in ui.page_text() and tag.search(ui.page_text()), 60,
                 "the MLflow run page with the run id and its slurm.job_id tag")
        save_page(ui, "mlflow-run")
