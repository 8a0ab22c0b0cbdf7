"""From validated DAG Params to a Slurm job: sbatch options and the containerised training command.

Pure functions (no I/O): the DAG's ``job_spec`` task calls :func:`training_job` with the run's
Params, the pinned image and the site settings, and hands the result to
:class:`~slurmflow.operators.slurm.SlurmSubmitJobOperator`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slurmflow.runtimes import container_command
from slurmflow.secrets import JOB_SECRET_NAMES

#: config file of each task inside the training image (docker/training.Dockerfile copies training/)
CONFIGS = {"surrogate": "surrogate_mongo.yaml", "deepcam": "deepcam.yaml"}
IMAGE_CONFIG_DIR = "/opt/hpctrain/configs"
#: training checkpoints and requeues on this signal, sent 60 s before the time limit
PREEMPT_SIGNAL = "B:USR2@60"


@dataclass(frozen=True)
class Site:
    """Where and how jobs run on this cluster (Airflow Variables and connections).

    :param partition: default partition.
    :param account: default account.
    :param runtime: default container runtime.
    :param auth_dir: cluster folder with the registry credentials (mode 700), see RegistryHook.
    :param tracking_uri: MLflow as seen from compute nodes (training falls back to offline).
    :param run_args: site flags for the runtime (e.g. podman's ``--runtime runc``).
    :param insecure_registry: the registry speaks plain HTTP (the local stack).
    :param extra_env: plain variables for every job's container (Variable ``slurmflow_job_env``),
        e.g. the site's ``NCCL_SOCKET_IFNAME``; never secrets: they are written into the script.
    """

    partition: str
    account: str
    runtime: str
    auth_dir: str | None = None
    tracking_uri: str = ""
    run_args: Sequence[str] = ()
    insecure_registry: bool = False
    extra_env: Mapping[str, str] = field(default_factory=dict)


#: the tasks whose monitored metric is ``val/iou`` (what ``target_iou`` is a target of)
IOU_TASKS = ("deepcam",)


def check_training_params(params: Mapping[str, Any]) -> None:
    """Combinations of training Params their schemas cannot refuse one by one.

    :raises ValueError: ``target_iou`` set for a task without an IoU.
    """
    target, task = params.get("target_iou"), params.get("task")
    if target is not None and task not in IOU_TASKS:
        raise ValueError(f"target_iou={target} is a target of val/iou, which only the {', '.join(IOU_TASKS)} "
                         f"task reports; task {task!r} has none: leave target_iou empty")


def training_argv(params: Mapping[str, Any]) -> list[str]:
    """``python -m hpctrain fit`` with the task's config and the Params as CLI overrides.

    :raises ValueError: see :func:`check_training_params`.
    """
    check_training_params(params)
    task = params["task"]
    argv = [
        # -P: the working directory is the job dir, and `python -m` would put it first on
        # sys.path, where its `tensorboard/` folder shadowed the package (Lightning then took
        # TensorBoard for installed and a resumed training failed at start).
        "python", "-P", "-m", "hpctrain", "fit", "--config", f"{IMAGE_CONFIG_DIR}/{CONFIGS[task]}",
        f"--seed_everything={int(params['seed'])}",
        f"--trainer.max_epochs={int(params['max_epochs'])}",
        f"--model.lr={float(params['lr'])}",
        f"--data.batch_size={int(params['batch_size'])}",
    ]
    width = int(params["width"])
    if task == "surrogate":
        mongo = {"database": "campaigns", "collection": params["data_collection"],
                 "query": params.get("data_query") or {}, "uri_env": "MONGO_URI"}
        argv += [f"--model.hidden_sizes={json.dumps([width, width, max(width // 2, 1)])}",
                 f"--data.mongo={json.dumps(mongo, sort_keys=True)}"]
    else:
        argv += [f"--model.width={width}", f"--data.seed={int(params['data_seed'])}"]
        if params.get("target_iou") is not None:
            argv.append(f"--run.target={float(params['target_iou'])}")
    return argv


#: Params that map one to one onto an sbatch option of the same name, when set.
_PLAIN_OPTIONS = ("qos", "constraint", "hint", "gpu_bind", "distribution", "wckey")


def sbatch_options(params: Mapping[str, Any], site: Site, array: str | None = None) -> dict[str, Any]:
    """Slurm resources from the Params; empty partition/account fall back to the site's.

    :raises ValueError: a combination the Params' schemas cannot refuse on their own (both
        ``gpus`` and ``gpus_per_node``; an ``sbatch_extra`` option that has its own Param).
    """
    opts: dict[str, Any] = {
        "partition": params.get("partition") or site.partition,
        "account": params.get("account") or site.account,
        "nodes": int(params["nodes"]),
        "ntasks_per_node": int(params["ntasks_per_node"]),
        "cpus_per_task": int(params["cpus_per_task"]),
        "mem": params["mem"],
        "time": params["time_limit"],
        "signal": PREEMPT_SIGNAL,
        "requeue": True,
    }
    opts.update({k: params[k] for k in _PLAIN_OPTIONS if params.get(k)})
    gpus, per_node = int(params.get("gpus") or 0), int(params.get("gpus_per_node") or 0)
    if gpus and per_node:
        raise ValueError(f"gpus={gpus} and gpus_per_node={per_node}: set one of them (the job's total or "
                         "each node's), not both")
    if per_node:
        opts["gpus_per_node"] = str(per_node)
    if gpus:
        opts["gpus"] = str(gpus)
    _one_process_per_gpu(int(params["nodes"]), int(params["ntasks_per_node"]), gpus, per_node)
    if params.get("exclusive"):
        opts["exclusive"] = True
    extra = dict(params.get("sbatch_extra") or {})
    taken = sorted(set(extra) & (set(opts) | set(_PLAIN_OPTIONS)))
    if taken:
        raise ValueError(f"sbatch_extra sets {', '.join(taken)}: use the Param(s) of that name")
    opts.update(extra)
    if array:
        opts["array"] = array
    return opts


def _one_process_per_gpu(nodes: int, tasks_per_node: int, gpus: int, per_node: int) -> None:
    """DDP runs one training process per Slurm task and gives each its own GPU (Lightning takes
    ``devices`` from the tasks per node): other counts leave GPUs idle or share one."""
    if not (gpus or per_node):
        return
    if gpus and gpus % nodes:
        raise ValueError(f"gpus={gpus} does not split evenly over nodes={nodes}")
    wanted = per_node or gpus // nodes
    if tasks_per_node != wanted:
        raise ValueError(f"one training process per GPU: ntasks_per_node={tasks_per_node} but {wanted} "
                         f"GPU(s) per node; set ntasks_per_node={wanted}")


def gpus_requested(params: Mapping[str, Any]) -> bool:
    """The run asks for GPUs (in total or per node): the container gets the GPU flag."""
    return int(params.get("gpus") or 0) > 0 or int(params.get("gpus_per_node") or 0) > 0


#: How long srun lets the other ranks finish after the first one ended (``srun --wait``).
#: Not ``--kill-on-bad-exit=1``: on preemption every rank checkpoints together and exits 75, and
#: the first to exit would have srun kill the rest, whose SIGTERM status (143) then outranks 75 in
#: srun's exit code, so the job failed instead of being requeued (a two-node run, seen on the
#: local cluster). A rank that crashes leaves the others stuck in a collective: they are ended
#: this long after it, and srun's exit code is the crash's.
RANKS_EXIT_WAIT_S = 60


def container_options(params: Mapping[str, Any], site: Site) -> dict[str, Any]:
    """Keyword arguments of :func:`~slurmflow.runtimes.container_command` for a training job."""
    multi = int(params["nodes"]) * int(params["ntasks_per_node"]) > 1
    launcher = ["srun", "--kill-on-bad-exit=0", f"--wait={RANKS_EXIT_WAIT_S}"]
    if params.get("cpu_bind"):  # srun's alone (sbatch has no --cpu-bind): a single task goes through srun too
        launcher.append(f"--cpu-bind={params['cpu_bind']}")
    env = {"MLFLOW_TRACKING_URI": site.tracking_uri, **site.extra_env}
    return {
        "gpus": gpus_requested(params),
        "binds": ["$SLURMFLOW_JOB_DIR"],
        # plain values only: they are written into the script and onto the runtime's command line
        "env": {k: v for k, v in env.items() if v},
        # the job's secrets (MONGO_URI among them) by name: the batch shell sourced their values
        # from the mode-600 secrets file (slurmflow.secrets), the runtime reads them from there
        "pass_env": ["SLURMFLOW_JOB_DIR", "HPCTRAIN_JOB_DIR", *JOB_SECRET_NAMES],
        "auth_dir": site.auth_dir,
        "insecure_registry": site.insecure_registry,
        "run_args": list(site.run_args),
        # One process per Slurm task for DDP: srun starts them, Lightning's SLURMEnvironment wires them.
        "launcher": launcher if multi or params.get("cpu_bind") else [],
    }


def training_job(params: Mapping[str, Any], image: str, site: Site) -> dict[str, Any]:
    """The full job: ``{"command", "sbatch_options", "runtime"}``.

    :param params: the run's validated Params (see :mod:`slurmflow.pipeline.params`).
    :param image: ``registry/repo@sha256:...`` from the image task.
    :param site: the cluster's settings.
    """
    runtime = params.get("container_runtime") or site.runtime
    command = container_command(runtime, image, training_argv(params), workdir="$SLURMFLOW_JOB_DIR",
                                **container_options(params, site))
    return {"command": command, "sbatch_options": sbatch_options(params, site), "runtime": runtime}
