"""From validated DAG Params to a Slurm job: sbatch options and the containerised training command.

Pure functions (no I/O): the DAG's ``job_spec`` task calls :func:`training_job` with the run's
Params, the pinned image and the site settings, and hands the result to
:class:`~slurmflow.operators.slurm.SlurmSubmitJobOperator`.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slurmflow.pipeline.experiments import STAGED_CONFIG, check_overrides, stage_config_lines
from slurmflow.runtimes import container_command
from slurmflow.secrets import JOB_SECRET_NAMES

#: the reference config of each task, in training/configs/ (staged into the job directory)
CONFIGS = {"surrogate": "surrogate_mongo", "deepcam": "deepcam"}
#: where a continued job finds its parent's checkpoint, relative to its job directory
INIT_CHECKPOINT = "init/parent.ckpt"
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


def config_name(params: Mapping[str, Any]) -> str:
    """The experiment config the run trains: the ``config`` Param, else the task's reference config."""
    return params.get("config") or CONFIGS[params["task"]]


#: How a job runs the training CLI. -P: the working directory is the job dir, and `python -m`
#: would put it first on sys.path, where its `tensorboard/` folder shadowed the package
#: (Lightning then took TensorBoard for installed and a resumed training failed at start).
HPCTRAIN = ("python", "-P", "-m", "hpctrain")


def check_training_params(params: Mapping[str, Any]) -> None:
    """Combinations of training Params their schemas cannot refuse one by one.

    :raises ValueError: ``target_iou`` set for a task without an IoU, or with a ``config`` (whose
        own metric decides: use the override ``--run.target=``); an override of what a Param owns.
    """
    check_overrides(params.get("overrides") or [])
    target, task = params.get("target_iou"), params.get("task")
    if target is not None and params.get("config"):
        raise ValueError(f"target_iou={target} belongs to the deepcam task; with config={params['config']!r} "
                         f"set a target of its monitored metric with the override --run.target={target}")
    if target is not None and task not in IOU_TASKS:
        raise ValueError(f"target_iou={target} is a target of val/iou, which only the {', '.join(IOU_TASKS)} "
                         f"task reports; task {task!r} has none: leave target_iou empty")


def training_argv(params: Mapping[str, Any], config: str = STAGED_CONFIG) -> list[str]:
    """``python -m hpctrain fit`` with the experiment config and the Params as CLI overrides.

    With a task's reference config, the task's Params apply (lr, batch size, width, data); with
    a ``config`` of the user's, only ``seed`` and ``max_epochs`` do: the config's own values
    hold. A continued run (``init_from``) starts from :data:`INIT_CHECKPOINT`; ``overrides``
    come last, so they win.

    :param config: the config file as the job sees it (default: the staged copy in its directory;
        preflight passes the repository's file).
    :raises ValueError: see :func:`check_training_params`.
    """
    check_training_params(params)
    task = params["task"]
    argv = [
        *HPCTRAIN, "fit", "--config", config,
        f"--seed_everything={int(params['seed'])}",
        f"--trainer.max_epochs={int(params['max_epochs'])}",
    ]
    if params.get("init_from"):
        argv += [f"--run.init_from={INIT_CHECKPOINT}", f"--run.init_mode={params.get('init_mode') or 'resume'}"]
    if params.get("config"):
        return argv + list(params.get("overrides") or [])
    argv += [f"--model.lr={float(params['lr'])}", f"--data.batch_size={int(params['batch_size'])}"]
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
    return argv + list(params.get("overrides") or [])


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


def init_checkpoint_lines(source: str) -> list[str]:
    """Shell lines copying a parent's checkpoint to ``$SLURMFLOW_JOB_DIR/init/parent.ckpt``.

    In the batch shell, before the container starts (the container sees only its job directory).
    Copied once, through a temporary name: a requeued attempt finds the copy (and resumes from its
    own ``checkpoints/last.ckpt`` anyway); the parent's file is only read.

    :param source: the checkpoint on the cluster (quoted here).
    """
    src, dest = shlex.quote(source), f'"$SLURMFLOW_JOB_DIR/{INIT_CHECKPOINT}"'
    return [
        "# slurmflow: continue from a parent run: its checkpoint, copied so the parent's stays intact",
        f"if [ ! -s {dest} ]; then",
        f'  mkdir -p "$SLURMFLOW_JOB_DIR/{posixpath.dirname(INIT_CHECKPOINT)}" || exit 1',
        f"  cp -- {src} {dest}.part && mv -f -- {dest}.part {dest} || {{",
        f"    echo {shlex.quote(f'[slurmflow] cannot copy the parent checkpoint {source}')} >&2; exit 2; }}",
        "fi",
    ]


def training_job(params: Mapping[str, Any], image: str, site: Site, config_text: str,
                 parent_checkpoint: str | None = None) -> dict[str, Any]:
    """The full job: ``{"command", "sbatch_options", "runtime"}``.

    :param params: the run's validated Params (see :mod:`slurmflow.pipeline.params`).
    :param image: ``registry/repo@sha256:...`` from the image task.
    :param site: the cluster's settings.
    :param config_text: the experiment config (:func:`config_name`), written into the job directory.
    :param parent_checkpoint: with ``init_from``: the parent's checkpoint on the cluster.
    :raises ValueError: ``init_from`` without a checkpoint; see also :func:`check_training_params`.
    """
    if params.get("init_from") and not parent_checkpoint:
        raise ValueError(f"init_from={params['init_from']} needs the parent's checkpoint on the cluster")
    runtime = params.get("container_runtime") or site.runtime
    run = container_command(runtime, image, training_argv(params), workdir="$SLURMFLOW_JOB_DIR",
                            **container_options(params, site))
    lines = stage_config_lines(config_text)
    if params.get("init_from"):
        lines += init_checkpoint_lines(str(parent_checkpoint))
    command = "\n".join([*lines, run.rstrip("\n")]) + "\n"
    return {"command": command, "sbatch_options": sbatch_options(params, site), "runtime": runtime}
