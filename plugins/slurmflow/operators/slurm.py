"""SlurmSubmitJobOperator: submit one sbatch job (or job array) exactly once and wait for it."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException, BaseOperator

# Only what defining and constructing the operator needs is imported here: DAG files import this
# module at parse time. The hook (SSH), the trigger, the wait engine, the job identity, sbatch
# rendering and parsing are imported where they are used, at run time.
from slurmflow.constants import DEFAULT_RETRY_STATES, DEFAULT_TEMPLATE, XCOM_JOB_KEY
from slurmflow.errors import SlurmError, SlurmSubmitError
from slurmflow.links import SlurmJobLink, job_url
from slurmflow.operators.outcome import completed_message, normalize_states, raise_for_failure, result_dict
from slurmflow.secrets import JobSecrets, SecretRefs, gather

if TYPE_CHECKING:
    from airflow.sdk import Context

    from slurmflow.hooks.slurm import SlurmHook
    from slurmflow.identity import JobIdentity
    from slurmflow.paths import JobPaths
    from slurmflow.sbatch import SbatchScript
    from slurmflow.status import JobSnapshot
    from slurmflow.triggers.slurm import SlurmJobTrigger
    from slurmflow.wait import WaitEvent, WaitSettings


class SlurmSubmitJobOperator(BaseOperator):
    """Submit a Slurm batch job over SSH and wait for it, without holding a worker slot.

    The script is rendered from ``include/sbatch/job.sh.j2`` (see :mod:`slurmflow.sbatch`) and is
    visible before submission: it is the templated field ``sbatch_script`` (Airflow's
    *Rendered Template* view) and :meth:`dry_run` prints it.

    **Exactly once.** The job name carries a deterministic key of the task instance
    (dag_id, run_id, task_id, map_index) and a *generation*. Before ``sbatch`` the operator
    looks the key up (squeue + sacct); after an unclear failure (timeout, dropped connection)
    it looks again before retrying. A retried or restarted task re-attaches to its live job,
    reuses its job's result if that job COMPLETED, and submits anew only when the earlier job
    failed or was cancelled.

    **Manual clear means "run again".** Clearing a task in the UI starts a new generation
    (Airflow raises the cleared task's ``max_tries``; ``max_tries - retries`` counts clears).
    A cleared task whose job is still running gets that job scancelled (by the trigger's
    ``on_kill``, or by the new try if the triggerer could not), and a fresh job is submitted
    into a fresh job directory, even if the earlier job had completed. Automatic retries,
    worker crashes and triggerer restarts stay in the same generation and re-attach.

    **Cancel means cancel.** Killing the task, marking it failed or success, or clearing it
    while its job runs scancels the job: ``on_kill`` in blocking mode; in deferrable mode the
    trigger's ``on_kill`` (Airflow 3.3 calls it on those user actions), after checking that the
    task instance really left the deferred state.

    :param command: shell fragment the job runs (e.g. ``slurmflow.runtimes.container_command(...)``);
        inserted verbatim, so quote its values (templated).
    :param sbatch_options: sbatch options such as ``partition``, ``account``, ``qos``, ``nodes``,
        ``ntasks_per_node``, ``gpus``, ``gres``, ``cpus_per_task``, ``mem``, ``time``,
        ``array`` (``"0-9%2"``), ``signal`` (``"B:USR2@120"``), ``requeue``, ``output``,
        ``error``, ``chdir``; unknown options fail with the list of valid ones (templated).
    :param environment: environment variables for the job, written (quoted) into the script (templated).
    :param secret_refs: connections whose credentials the job receives
        (:class:`~slurmflow.secrets.SecretRefs` or its dict: MLflow login, Mongo URI, registry
        login). Their values go only into the job's mode-600 secrets file, which the script
        sources on the node; they are masked in this task's log, its rendered fields and, since
        the trigger carries these references (never values) and masks them again, in the
        triggerer's log too - lines the job itself prints included. See :mod:`slurmflow.secrets`.
    :param secret_environment: further secret variables for that file (templated, e.g.
        ``{{ conn.x.password }}``); masked in this task's process. The trigger cannot mask these
        (it never holds values): a deferrable job that prints them should get them through a
        connection in ``secret_refs`` instead.
    :param setup: shell lines run before the command (``module load ...``) (templated).
    :param slurm_conn_id: SSH connection of the login node.
    :param job_root: directory on the cluster under which per-run job directories are created
        (default: connection extra ``job_root``, else ``$HOME/slurmflow-jobs``) (templated).
    :param deferrable: wait in the triggerer (default) or, if False, on the worker.
    :param poll_interval: fastest poll interval, seconds.
    :param max_poll_interval: slowest poll interval while nothing changes, seconds.
    :param job_timeout: how long to wait for the job; then it is scancelled and the task fails.
        Defaults to ``execution_timeout`` (which Airflow does not apply to deferred waits).
    :param retry_states: Slurm end states that raise ``AirflowException`` (Airflow may retry);
        every other failure raises ``AirflowFailException``. Default: NODE_FAIL, BOOT_FAIL, PREEMPTED.
    :param cancel_array_on_failure: scancel the remaining array tasks as soon as one fails.
    :param tolerate_failed_array_tasks: an array whose tasks all ended is a success even when
        some failed (logged, with the first failure's tail); the result's ``array`` lists them.
        For sweeps, whose registration decides how many failed trials are too many.
    :param stream_logs: copy new job output lines into the task log while the job runs.
    :param log_tail_lines: lines of the job log included in a failure.
    :param preflight: run ``sbatch --test-only`` before submitting (validates partition, account,
        QOS, GRES against the cluster); a rejection fails the task without retries.
    :param template: sbatch template file name; ``template_dir``: its directory.
    :param cleanup_secrets: delete the secrets file once the job has ended.
    :param missing_grace: seconds a job may be unknown to Slurm before the task fails.

    XCom: ``slurm_job`` (pushed at submission: ``job_id``, ``job_name``, ``job_dir``,
    ``log_path``, ``script_path``, ``action``, ``generation``, ``cluster``) and the return value
    (the result dict: the above plus ``state``, ``reason``, ``exit_code``, ``signal``,
    ``restarts``, ``elapsed``, ``elapsed_seconds``, ``node_list``, ``start``, ``end``, ``array``).
    """

    template_fields: Sequence[str] = (
        "command",
        "setup",
        "sbatch_options",
        "environment",
        "secret_environment",
        "job_root",
        "slurm_conn_id",
        "sbatch_script",
    )
    template_fields_renderers = {
        "command": "bash",
        "setup": "bash",
        "sbatch_script": "bash",
        "sbatch_options": "json",
        "environment": "json",
    }
    ui_color = "#dbe9f6"
    operator_extra_links = (SlurmJobLink(),)

    def __init__(
        self,
        *,
        command: str,
        sbatch_options: Mapping[str, Any] | None = None,
        environment: Mapping[str, Any] | None = None,
        secret_environment: Mapping[str, Any] | None = None,
        secret_refs: SecretRefs | Mapping[str, Any] | None = None,
        setup: str = "",
        slurm_conn_id: str = "slurm_default",
        job_root: str | None = None,
        deferrable: bool = True,
        poll_interval: float = 2.0,
        max_poll_interval: float = 60.0,
        job_timeout: timedelta | float | None = None,
        retry_states: Collection[str] = DEFAULT_RETRY_STATES,
        cancel_array_on_failure: bool = False,
        tolerate_failed_array_tasks: bool = False,
        stream_logs: bool = True,
        log_tail_lines: int = 50,
        preflight: bool = False,
        template: str = DEFAULT_TEMPLATE,
        template_dir: str | None = None,
        cleanup_secrets: bool = True,
        missing_grace: float = 120.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.sbatch_options = dict(sbatch_options or {})
        self.environment = dict(environment or {})
        self.secret_environment = dict(secret_environment or {})
        self.secret_refs = SecretRefs.from_dict(secret_refs)
        self.setup = setup
        self.slurm_conn_id = slurm_conn_id
        self.job_root = job_root
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.job_timeout = job_timeout
        self.retry_states = normalize_states(retry_states)
        self.cancel_array_on_failure = cancel_array_on_failure
        self.tolerate_failed_array_tasks = tolerate_failed_array_tasks
        self.stream_logs = stream_logs
        self.log_tail_lines = log_tail_lines
        self.preflight = preflight
        self.template = template
        self.template_dir = template_dir
        self.cleanup_secrets = cleanup_secrets
        self.missing_grace = missing_grace
        #: The rendered sbatch script (filled in when templates are rendered, before execute).
        self.sbatch_script = ""
        self._script: SbatchScript | None = None
        self._secrets: JobSecrets | None = None
        self._identity: JobIdentity | None = None
        self._job_id: str | None = None

    @cached_property
    def hook(self) -> SlurmHook:
        from slurmflow.hooks.slurm import SlurmHook  # deferred: SSH stack, not needed to parse

        return SlurmHook(self.slurm_conn_id, job_root=self.job_root)

    # --- rendering ----------------------------------------------------------------------------

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Render templates, then the sbatch script itself (so it shows as a rendered field)."""
        # Cleared first: a script rendered earlier (bash full of "${...}") is no Jinja template.
        self.sbatch_script = ""
        super().render_template_fields(context, jinja_env)
        # Masked before anything is stored or logged: Airflow redacts the rendered fields with
        # the masker, and a resumed task (execute_complete) renders, so masks, again.
        self._secrets = self._gather_secrets()
        self._secrets.mask()
        self._prepare(context)

    def _gather_secrets(self) -> JobSecrets:
        try:
            return gather(self.secret_refs, self.secret_environment)
        except ValueError as exc:
            raise AirflowFailException(f"invalid secrets for task {self.task_id}: {exc}") from exc

    def _prepare(self, context: Context) -> SbatchScript:
        from slurmflow.identity import JobIdentity, JobKey, generation_of  # deferred: run time only
        from slurmflow.sbatch import render_script

        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        self._identity = JobIdentity(
            JobKey(ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else int(map_index)),
            generation_of(getattr(ti, "max_tries", 0), self.retries),
        )
        ident = self._identity
        self._script = self.build(ident.job_dir(self.hook.job_root), ident.job_name, ident.comment)
        self.sbatch_script = render_script(self._script, template=self.template, template_dir=self.template_dir)
        return self._script

    def build(self, job_dir: str, job_name: str, comment: str = "") -> SbatchScript:
        """Validate this operator's inputs into an :class:`~slurmflow.sbatch.SbatchScript`.

        :raises AirflowFailException: an option, value or variable name is invalid.
        """
        from slurmflow.sbatch import SbatchOptionError, build_script  # deferred: run time only

        try:
            return build_script(
                command=self.command,
                job_name=job_name,
                job_dir=job_dir,
                options=self.sbatch_options,
                environment=self.environment,
                secret_names=self._secret_names(),
                comment=comment,
                setup=self.setup,
            )
        except SbatchOptionError as exc:
            raise AirflowFailException(f"invalid Slurm job definition for task {self.task_id}: {exc}") from exc

    def _secret_names(self) -> tuple[str, ...]:
        if self._secrets is not None:
            return self._secrets.names
        # A preview reads no connection: the names the references may give
        return tuple(sorted({*self.secret_environment, *self.secret_refs.names()}))

    def preview_script(self, run_id: str = "dry_run") -> str:
        """The sbatch script this task would submit, without a run context or a connection
        (placeholder run id; ``/JOB_ROOT`` unless ``job_root`` is set). Templates are not rendered."""
        from slurmflow.identity import JobIdentity, JobKey  # deferred: run time only
        from slurmflow.sbatch import render_script

        ident = JobIdentity(JobKey(self.dag_id, run_id, self.task_id))
        script = self.build(ident.job_dir(self.job_root or "/JOB_ROOT"), ident.job_name, ident.comment)
        return render_script(script, template=self.template, template_dir=self.template_dir)

    def dry_run(self) -> None:
        """Log the sbatch script this task would submit (see :meth:`preview_script`)."""
        self.log.info("sbatch script for %s:\n%s", self.task_id, self.preview_script())

    # --- execution ----------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any] | None:
        from slurmflow.parsing import SlurmParseError  # deferred: run time only
        from slurmflow.versions import UnsupportedSlurmVersion

        script = self._script or self._prepare(context)
        ident = self._identity
        assert ident is not None
        secrets = self._secrets or self._gather_secrets()
        secrets_text = secrets.file_text() if script.secret_names else None
        try:
            if self.preflight:
                self.hook.stage(script, self.sbatch_script, secrets_text)
                self.log.info("Pre-flight (sbatch --test-only): %s", self.hook.test_only(script.script_path))
            outcome = self.hook.submit(ident.key, ident.generation, script, self.sbatch_script, secrets_text)
        except SlurmSubmitError as exc:
            raise AirflowFailException(f"Slurm rejected job {script.job_name}: {exc}") from exc
        except UnsupportedSlurmVersion as exc:  # the cluster's Slurm does not change between tries
            raise AirflowFailException(str(exc)) from exc
        except (SlurmError, SlurmParseError) as exc:
            raise AirflowException(f"could not submit Slurm job {script.job_name}: {exc}") from exc

        self._job_id = outcome.job_id
        job = self._job_record(script, outcome.job_id, outcome.action)
        self.log.info("Slurm job %s (%s): %s; job dir %s", outcome.job_id, outcome.action, outcome.reason, script.job_dir)
        context["ti"].xcom_push(key=XCOM_JOB_KEY, value=job)

        if outcome.action == "reused":
            # The job ended before this try could wait for it (a retry after the task died right
            # after sbatch): one blocking poll shows its log in this try's log, as a wait would
            # have, and concludes on its state.
            self.log.info("Reusing the result of COMPLETED job %s", outcome.job_id)
            return self._wait_blocking(job, context)

        if self.deferrable:
            self.defer(trigger=self._trigger(job), method_name="execute_complete", kwargs={"job": job})
        return self._wait_blocking(job, context)

    def _job_record(self, script: SbatchScript, job_id: str, action: str) -> dict[str, Any]:
        from slurmflow.parsing import expand_array_indices  # deferred: run time only

        tasks = expand_array_indices(script.options["array"]) if script.is_array else []
        user = self.hook.username
        paths = script.paths(user)
        return {
            "job_id": job_id,
            "job_name": script.job_name,
            "job_dir": script.job_dir,
            "script_path": paths.script,
            "log_path": paths.log(job_id, tasks[0] if tasks else None) or "",
            "log_pattern": script.output_pattern,
            "paths": paths.to_dict(),
            "secrets_path": script.secrets_path,
            "array_tasks": len(tasks) or None,
            "user": user,
            "action": action,
            "generation": self._identity.generation,
            # the one identity of this training: MLflow run key, model version, catalog document
            "identity": self._identity.as_dict(),
            "run_key": self._identity.run_key,
            "cluster": self.slurm_conn_id,
            "deadline": self._deadline(),
            "url": job_url(self._url_template(), job_id, self.slurm_conn_id),
        }

    def _url_template(self) -> str | None:
        try:
            return self.hook.get_connection(self.slurm_conn_id).extra_dejson.get("job_url_template")
        except Exception:
            return None

    def _deadline(self) -> float | None:
        limit = self.job_timeout if self.job_timeout is not None else self.execution_timeout
        if limit is None:
            return None
        seconds = limit.total_seconds() if isinstance(limit, timedelta) else float(limit)
        return time.time() + seconds

    def _wait_settings(self, job: Mapping[str, Any]) -> WaitSettings:
        from slurmflow.wait import WaitSettings  # deferred: run time only

        return WaitSettings(
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deadline=job["deadline"],
            missing_grace=self.missing_grace,
            cancel_array_on_failure=self.cancel_array_on_failure,
            stream_logs=self.stream_logs,
            tail_lines=self.log_tail_lines,
        )

    @staticmethod
    def _paths(job: Mapping[str, Any]) -> JobPaths:
        from slurmflow.paths import JobPaths  # deferred: run time only

        if job.get("paths"):
            return JobPaths.from_dict(job["paths"])
        # a record pushed before the paths were recorded (a task resumed across an upgrade)
        return JobPaths(job["job_dir"], job["log_pattern"], job.get("user", ""), job["job_name"])

    def _trigger(self, job: Mapping[str, Any]) -> SlurmJobTrigger:
        from slurmflow.triggers.slurm import SlurmJobTrigger  # deferred: poller, asyncio, triggers.base

        return SlurmJobTrigger(
            job_id=job["job_id"],
            slurm_conn_id=self.slurm_conn_id,
            settings=self._wait_settings(job).to_dict(),
            paths=self._paths(job).to_dict(),
            expected_tasks=job["array_tasks"],
            cancel_on_kill=True,
            secret_refs=self.secret_refs.to_dict() if self.secret_refs else None,
            # A success ends the task in the triggerer (no resume on a worker: ~1.5 s sooner);
            # anything else resumes execute_complete, which owns retries and cancellation.
            finish={"job": dict(job), "cleanup": self._cleanup_paths(job)},
        )

    def _cleanup_paths(self, job: Mapping[str, Any]) -> list[str]:
        """Files the job leaves that nothing needs once it is over: its secrets file."""
        return [job["secrets_path"]] if self.cleanup_secrets and job.get("secrets_path") else []

    def _wait_blocking(self, job: Mapping[str, Any], context: Context) -> dict[str, Any] | None:
        from slurmflow.operators.waiting import BlockingWaiter  # deferred: the wait engine and hook

        waiter = BlockingWaiter(
            hook=self.hook,
            job_id=job["job_id"],
            log=self.log,
            settings=self._wait_settings(job),
            paths=self._paths(job),
            expected_tasks=job["array_tasks"],
        )
        return self._conclude(waiter.wait(), job, self._last_try(context))

    def execute_complete(self, context: Context, event: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
        """Resume after the trigger fired: success, failure, timeout, missing or error."""
        from slurmflow.wait import WaitEvent  # deferred: run time only

        self._job_id = job["job_id"]
        try:
            parsed = WaitEvent.from_payload(event)
        except ValueError as exc:
            raise AirflowException(f"waiting for Slurm job {job['job_id']} failed: {exc}") from exc
        return self._conclude(parsed, job, self._last_try(context))

    @staticmethod
    def _last_try(context: Context) -> bool:
        ti = context["ti"]
        return getattr(ti, "try_number", 1) > getattr(ti, "max_tries", 0)

    def _conclude(self, event: WaitEvent, job: Mapping[str, Any], last_try: bool) -> dict[str, Any] | None:
        """From the wait's event to the task's outcome (one rule for both wait modes)."""
        if event.job_ended:
            return self._finish(event.snapshot, job, event.log_tail)
        if event.status == "timeout":
            self._cancel_quietly(job["job_id"])
            self._remove_secrets(job)
            raise AirflowException(f"{event.message}; job {job['job_id']} cancelled")
        # Polling failed for good (cluster unreachable, job vanished). With retries left the job
        # is left alone: the retry re-attaches to it. On the last try it is cancelled, so no
        # job outlives its task.
        if last_try:
            self._cancel_quietly(job["job_id"])
            self._remove_secrets(job)
        raise AirflowException(f"waiting for Slurm job {job['job_id']} failed: {event.message}")

    def _remove_secrets(self, job: Mapping[str, Any]) -> None:
        """Delete the job's secrets file: its job is over (or cancelled), nothing sources it again."""
        for path in self._cleanup_paths(job):
            try:
                self.hook.remove(path)
            except SlurmError as exc:
                self.log.warning("Could not delete the secrets file %s: %s", path, exc)

    def _finish(self, snap: JobSnapshot, job: Mapping[str, Any], tail: str) -> dict[str, Any] | None:
        self._remove_secrets(job)
        result = result_dict(snap, job)
        if not snap.state.is_successful and self.tolerate_failed_array_tasks and snap.is_array:
            self.log.warning("Slurm job %s: array ended with failed tasks (%s); tolerated, the next step "
                             "decides. First failure's log:\n%s", snap.job_id, snap.progress, tail or "(none)")
            return result
        if not snap.state.is_successful:
            if tail:
                self.log.error("Last lines of %s:\n%s", job.get("log_path"), tail)
            raise_for_failure(snap, self.retry_states, tail)
        self.log.info("%s", completed_message(result))
        return result

    # --- cancellation -------------------------------------------------------------------------

    def _cancel_quietly(self, job_id: str) -> None:
        from slurmflow.parsing import SlurmParseError  # deferred: run time only

        try:
            self.hook.cancel([job_id])
            self.log.warning("Cancelled Slurm job %s", job_id)
        except (SlurmError, SlurmParseError) as exc:
            self.log.error("scancel %s failed: %s", job_id, exc)

    def on_kill(self) -> None:
        """The task was killed while waiting on the worker (blocking mode, or during submission):
        scancel its job. Without a job id yet, the key lookup finds it."""
        from slurmflow.parsing import SlurmParseError  # deferred: run time only

        if self._job_id:
            self._cancel_quietly(self._job_id)
            return
        if self._identity is None:
            return
        try:
            found = self.hook.find_jobs(self._identity.key, self._identity.generation)
        except (SlurmError, SlurmParseError) as exc:
            self.log.error("Could not look up this task's Slurm job to cancel it: %s", exc)
            return
        live = [job_id for job_id, snap in found.items() if not snap.state.is_terminal]
        for job_id in live:
            self._cancel_quietly(job_id)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """Airflow resumes with ``__fail__`` when the trigger crashed or Airflow timed the
        deferral out; the task is about to fail, so its job must not keep running."""
        if next_method == "__fail__":
            ti = context["ti"]
            record = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_JOB_KEY, map_indexes=ti.map_index)
            if isinstance(record, Mapping) and record.get("job_id"):
                self._cancel_quietly(str(record["job_id"]))
        return super().resume_execution(next_method, next_kwargs, context)


__all__ = ["XCOM_JOB_KEY", "SlurmSubmitJobOperator"]
