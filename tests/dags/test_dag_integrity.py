"""Every file in dags/ imports cleanly, declares ownership/retries/tags, and stays light to parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))
EXPECTED = {"train_model", "nightly_retrain", "hparam_sweep", "experiment_pipeline"}
# Modules that must never be imported while parsing a DAG file: each costs seconds and the
# dag-processor re-parses every file every refresh interval.
HEAVY = ("torch", "lightning", "mlflow", "pymongo", "docker", "paramiko", "asyncssh", "pandas", "hpctrain")
# Modules DAG parsing used to import and must not again (bench/dag_parse.py: they made each DAG
# file up to 2.5x as slow to parse as a plain TaskFlow DAG). Defining and constructing the
# operators needs none of them; the operators and steps import them where they run. Values the
# operators need at construction (defaults, XCom keys) live in slurmflow.constants.
PARSE_TIME_ABSENT = (
    "slurmflow.hooks",  # every hook: SSH, registry, image build, MLflow, Mongo
    "slurmflow.triggers", "slurmflow.poller", "slurmflow.wait", "slurmflow.operators.waiting",
    "slurmflow.sensors", "slurmflow.status", "slurmflow.parsing", "slurmflow.commands", "slurmflow.logs",
    "slurmflow.sbatch", "slurmflow.paths",  # ~35 option regexes compiled on import
    "slurmflow.pipeline.jobs", "slurmflow.runtimes", "slurmflow.images",
    "slurmflow.identity", "slurmflow.states",
    "slurmflow.pipeline.results", "slurmflow.pipeline.sweep", "slurmflow.pipeline.promotion",
    "airflow.triggers.base", "tarfile",
)


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_expected_dags_present(dagbag):
    assert EXPECTED <= set(dagbag.dag_ids)


def test_owner_retries_tags(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"
            assert task.retries is not None and task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_parse_is_light(path):
    """Parse each DAG file in a fresh interpreter; report its time, forbid heavy imports."""
    paths = [str(REPO / "plugins"), str(REPO)]
    probe = (
        f"import sys, time, json, runpy; sys.path[:0] = {paths!r}\n"
        "import airflow.sdk\n"  # the SDK itself is paid once per dag-processor, not per file
        f"t = time.perf_counter(); runpy.run_path({str(path)!r}); dt = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': dt, 'modules': sorted(sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{path.name}: parsed in {result['seconds'] * 1000:.0f} ms")
    heavy = sorted({m.split('.')[0] for m in result["modules"]} & set(HEAVY))
    assert heavy == [], f"{path.name} imports {heavy} at parse time"
    slow = sorted(m for m in result["modules"] if any(m == a or m.startswith(a + ".") for a in PARSE_TIME_ABSENT))
    assert slow == [], f"{path.name} imports {slow} at parse time: import them where they are used"


@pytest.mark.parametrize("dag_id", ["train_model", "nightly_retrain", "hparam_sweep", "experiment_pipeline"])
def test_trigger_form_defaults_are_valid_and_optional_means_null(dagbag, dag_id):
    """The Trigger form marks a field required unless its type admits null; an empty-string
    default with an "or empty" pattern therefore rendered in error (issue 9). Every default
    must validate, and no string Param may default to ``""``."""
    import jsonschema

    for name, param in dagbag.dags[dag_id].params.items():
        schema, value = param.schema, param.value
        jsonschema.validate(value, schema)  # the default itself is valid
        assert value != "", f"{dag_id}.{name}: use None (type [null, string]) for 'site default'"
        assert schema.get("section") and param.description, f"{dag_id}.{name}: section + description"
        if value is None:
            assert "null" in schema["type"], f"{dag_id}.{name}: a None default needs 'null' in its type"
            if "enum" in schema:
                assert None in schema["enum"], f"{dag_id}.{name}: an optional enum lists None"


@pytest.mark.parametrize("query, ok", [
    ({"valid": True}, True),
    ({"day": {"$gte": 1, "$lte": 3}, "$or": [{"holdout": False}, {"kind": {"$in": ["a", "b"]}}]}, True),
    ({"tags": {"$elemMatch": {"$regex": "^x", "$options": "i"}}}, True),
    ({"$where": "sleep(1000)"}, False),
    ({"x": {"$elemMatch": {"$function": {"body": "return 1", "args": [], "lang": "js"}}}}, False),
    ({"$and": [{"y": {"$accumulator": {}}}]}, False),
    ({"$expr": {"$gt": ["$a", 1]}}, False),
])
def test_mongo_filters_are_data(dagbag, query, ok):
    """data_query admits field names and plain query operators only, at any depth."""
    import jsonschema

    for dag_id in ("train_model", "nightly_retrain", "hparam_sweep"):
        schema = dagbag.dags[dag_id].params.get_param("data_query").schema
        if ok:
            jsonschema.validate(query, schema)
        else:
            with pytest.raises(jsonschema.ValidationError, match=r"\$"):
                jsonschema.validate(query, schema)


def test_tasks_that_call_a_service_ride_out_its_restart(dagbag):
    """Regression (make chaos, stop-registry at build): one retry after 30 s failed the run when
    the registry was down for 43 s. Every task that calls the registry, MLflow or Mongo now
    retries for about 4 minutes, whatever its DAG's default_args say."""
    from slurmflow.retries import SERVICE_RETRIES

    want = (SERVICE_RETRIES["retries"], SERVICE_RETRIES["retry_delay"], True, SERVICE_RETRIES["max_retry_delay"])
    service_tasks = {"build_image", "register", "evaluate_and_promote", "catalog", "catalog_sweep", "report"}
    checked = set()
    for dag_id in ("train_model", "nightly_retrain", "hparam_sweep", "experiment_pipeline"):
        for task in dagbag.dags[dag_id].tasks:
            if task.task_id in service_tasks:
                checked.add(task.task_id)
                assert (task.retries, task.retry_delay, task.retry_exponential_backoff, task.max_retry_delay) == want, (
                    dag_id, task.task_id)
    assert checked == service_tasks


@pytest.mark.parametrize("dag_id", ["train_model", "nightly_retrain", "hparam_sweep", "experiment_pipeline"])
def test_every_param_is_a_valid_draft7_schema(dagbag, dag_id):
    """Parse-time validation checks each schema against its dialect's metaschema: draft 7 is the
    cheap one (slurmflow.pipeline.params.draft7); a Param added without it slows every parse."""
    import jsonschema

    from slurmflow.pipeline.params import DRAFT_7

    for name, param in dagbag.dags[dag_id].params.items():
        assert param.schema.get("$schema") == DRAFT_7, f"{dag_id}.{name}: wrap the DAG's Params in draft7()"
        jsonschema.Draft7Validator.check_schema(param.schema)


def test_experiment_pipeline_stages(dagbag):
    """prepare -> train -> evaluate, each a Slurm job after its spec (key, cache entry); then the
    report and the catalog. Every stage's params are Params of the form."""
    from slurmflow.pipeline.stage_jobs import STAGE_PARAMS
    from slurmflow.pipeline.stage_tasks import StageJobOperator

    dag = dagbag.dags["experiment_pipeline"]
    stages = ["prepare", "train", "evaluate"]
    for stage in stages:
        assert isinstance(dag.get_task(stage), StageJobOperator)
        assert dag.get_task(stage).upstream_task_ids == {f"{stage}_spec"}
        assert set(STAGE_PARAMS[stage]) <= set(dag.params)
    assert dag.get_task("train_spec").upstream_task_ids == {"prepare", "build_image"}
    assert dag.get_task("evaluate_spec").upstream_task_ids == {"train", "build_image"}
    assert dag.get_task("report").upstream_task_ids == {"evaluate", "build_image"}
    assert dag.get_task("catalog").upstream_task_ids == {"report"}
    assert dag.timetable.can_be_scheduled  # a schedule: backfills work, and manual triggers
