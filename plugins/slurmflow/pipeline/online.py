"""online_training's job: the staging store, the producer ensemble and the trainer in one allocation.

SmartSim's experiment (an Orchestrator, an ensemble of simulation replicas that put batches into
it, a model that trains on them as they arrive) as one ``sbatch``: submitted exactly once like
every slurmflow job, followed by one deferred wait, requeued as one job. Three job steps that do
not share CPUs (``srun --exact``; ``--mem-per-cpu`` gives each step its CPUs' share of memory):

1. ``hpctrain store``: Debian's redis-server on the node Slurm picks, until the job ends; it
   writes ``host:port`` into ``<job dir>/.staging/address`` once it answers with the password
   (``SLURMFLOW_STAGING_PASSWORD``, from the job's mode-600 secrets file). No address within the
   store's own start timeout (60 s once the image is there) and the job fails with its reason.
2. ``hpctrain produce``: ``replicas x ranks_per_replica`` ranks (``SLURM_PROCID`` gives each its
   place). A producer that dies does not fail the job: the trainer reports it dead.
3. ``hpctrain fit`` with ``training/configs/online/online.yaml``: ``trainer_ranks`` DDP ranks.
   Its exit status is the job's (75 after a preemption checkpoint: the batch shell requeues).

The store and the producers run in process groups of their own, so the preemption signal the
batch shell forwards to its command reaches only the trainer (which checkpoints, cursor
included); they are stopped when the trainer's step ends. A requeued job starts a new, empty
store, and the producers resume at the trainer's checkpointed cursor (hpctrain.staging's
``CURSOR_FILE``). Every step's output reaches the job log, prefixed ``[store]`` / ``[producer]``,
so the task log shows all three components. Design and alternatives: docs/online-training-slurm.md.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

# The training package's own names (it is installed beside the plugins: preflight's config check
# imports it too): the variables the components read, the file the store writes its address to.
from hpctrain.staging import ADDRESS_ENV as STAGING_ADDRESS
from hpctrain.staging import NAMESPACE_ENV as STAGING_NAMESPACE
from hpctrain.staging import PASSWORD_ENV as STAGING_PASSWORD
from hpctrain.store import ADDRESS_FILE
from slurmflow.pipeline.experiments import STAGED_CONFIG, read_config, stage_config_lines
from slurmflow.pipeline.jobs import HPCTRAIN, PREEMPT_SIGNAL, RANKS_EXIT_WAIT_S, Site, container_options
from slurmflow.runtimes import container_command
from slurmflow.sbatch import forwarded_signal

#: the trainer's experiment config (in a subfolder: train_model's ``config`` Param does not offer it)
ONLINE_CONFIG = "online/online"
#: the store's folder in the job directory (mode 700): its address file
STAGING_DIR = ".staging"


def task_counts(params: Mapping[str, Any]) -> dict[str, int]:
    """Tasks of each component: one store, the producer ensemble, the trainer's ranks."""
    return {"store": 1, "producers": int(params["replicas"]) * int(params["ranks_per_replica"]),
            "trainer": int(params["trainer_ranks"])}


def sbatch_options(params: Mapping[str, Any], site: Site) -> dict[str, Any]:
    """The allocation: every component's tasks, ``cpus_per_task`` CPUs each."""
    opts: dict[str, Any] = {
        "partition": params.get("partition") or site.partition,
        "account": params.get("account") or site.account,
        "ntasks": sum(task_counts(params).values()),
        "cpus_per_task": int(params["cpus_per_task"]),
        "mem_per_cpu": params["mem_per_cpu"],
        "time": params["time_limit"],
        "signal": PREEMPT_SIGNAL,
        "requeue": True,
    }
    if params.get("qos"):
        opts["qos"] = params["qos"]
    return opts


def resources_text(params: Mapping[str, Any]) -> str:
    """How the tasks add up, for an error message at preflight."""
    n = task_counts(params)
    return (f"1 store + {params['replicas']} x {params['ranks_per_replica']} producers + {n['trainer']} trainer "
            f"rank(s) = {sum(n.values())} tasks of {params['cpus_per_task']} CPU(s)")


def producer_argv(params: Mapping[str, Any]) -> list[str]:
    """``hpctrain produce`` for every rank of the ensemble (each finds its place in SLURM_PROCID)."""
    return [*HPCTRAIN, "produce", f"--replicas={int(params['replicas'])}",
            f"--ranks-per-replica={int(params['ranks_per_replica'])}", f"--rounds={int(params['rounds'])}",
            f"--interval-s={float(params['interval_s'])}", f"--batch-size={int(params['samples_per_batch'])}",
            f"--features={int(params['features'])}", f"--seed={int(params['seed'])}",
            f"--max-buffered-batches={int(params['max_buffered_batches'])}"]


def trainer_argv(params: Mapping[str, Any]) -> list[str]:
    """``hpctrain fit`` of the online config with the run's Params."""
    return [*HPCTRAIN, "fit", "--config", STAGED_CONFIG, f"--seed_everything={int(params['seed'])}",
            f"--trainer.max_epochs={int(params['max_epochs'])}", f"--model.lr={float(params['lr'])}",
            f"--model.hidden_sizes=[{int(params['width'])}]", f"--data.batch_size={int(params['batch_size'])}",
            f"--data.producer_timeout_s={float(params['producer_timeout_s'])}"]


def _step(tasks: int, cpus: int) -> list[str]:
    """srun of one component: its own CPUs (``--exact``); a rank that fails does not end the others."""
    return ["srun", f"--ntasks={tasks}", f"--cpus-per-task={cpus}", "--exact", "--kill-on-bad-exit=0"]


def _background(name: str, fragment: str) -> list[str]:
    """Start a component's fragment in a process group of its own (``set -m``: its pid is the
    group's id, ``$sf_<name>``), its lines prefixed ``[name]`` (a process substitution, not a
    pipe, whose ``$!`` would be sed's)."""
    return ["set -m", "(", fragment.rstrip("\n"), f") > >(sed -u {shlex.quote(f's/^/[{name}] /')}) 2>&1 &",
            f"sf_{name}=$!", "set +m"]


def online_job(params: Mapping[str, Any], image: str, site: Site, config_text: str | None = None) -> dict[str, Any]:
    """The whole job: ``{"command", "sbatch_options", "runtime"}`` (like :func:`~slurmflow.pipeline.jobs.training_job`).

    :param config_text: the trainer's config (default: ``training/configs/online/online.yaml``).
    """
    runtime = params.get("container_runtime") or site.runtime
    cpus, counts = int(params["cpus_per_task"]), task_counts(params)
    # the site's container settings for a CPU process; each step below brings its own launcher
    base = container_options({"nodes": 1, "ntasks_per_node": 1}, site)
    base["pass_env"] = [*base["pass_env"], STAGING_ADDRESS, STAGING_NAMESPACE, STAGING_PASSWORD]

    def component(argv: list[str], launcher: list[str]) -> str:
        return container_command(runtime, image, argv, workdir="$SLURMFLOW_JOB_DIR", **{**base, "launcher": launcher})

    staging = f'"$SLURMFLOW_JOB_DIR/{STAGING_DIR}"'
    lines = [
        *stage_config_lines(config_text or read_config(ONLINE_CONFIG)),
        "# slurmflow online training: the store, the producers and the trainer as steps of this allocation",
        f'export {STAGING_NAMESPACE}="job-${{SLURM_JOB_ID:-0}}"',
        f"mkdir -p {staging} && chmod 700 {staging} && rm -f {staging}/{ADDRESS_FILE} || exit 1",
        # stop whatever still runs when this ends (the trainer's end, a failed start, a signal)
        "trap 'kill -TERM -- ${sf_producer:+-$sf_producer} ${sf_store:+-$sf_store} 2>/dev/null' EXIT",
        *_background("store", component([*HPCTRAIN, "store", "--dir", STAGING_DIR],  # relative: the job dir is the workdir
                                        _step(counts["store"], cpus))),
        f"until [ -s {staging}/{ADDRESS_FILE} ]; do",
        '  if ! kill -0 "$sf_store" 2>/dev/null; then',
        '    echo "[slurmflow] the staging store did not come up (its lines above, marked [store]): no training"',
        "    exit 1",
        "  fi",
        "  sleep 0.5",
        "done",
        f'export {STAGING_ADDRESS}="$(cat {staging}/{ADDRESS_FILE})"',
        f'echo "[slurmflow] staging store at ${STAGING_ADDRESS}"',
        *_background("producer", component(producer_argv(params), [*_step(counts["producers"], cpus), "--label"])),
    ]
    # the trainer's ranks on one node, and said so: Lightning's SLURMEnvironment refuses a bare
    # --ntasks above 1 (it reads the world from SLURM_NTASKS_PER_NODE)
    trainer = component(trainer_argv(params), [*_step(counts["trainer"], cpus), "--nodes=1",
                                               f"--ntasks-per-node={counts['trainer']}",
                                               f"--wait={RANKS_EXIT_WAIT_S}"]).rstrip("\n").split("\n")
    # The batch shell forwards the preemption signal to this shell's process group. Its EXIT trap
    # keeps this shell from exec'ing the trainer's srun away, so the shell is in that group too and
    # died of the signal while the trainer checkpointed (the job was requeued before the checkpoint
    # was written: e2e). A no-op handler, set just before the trainer runs (a signal during the image
    # pull still ends the shell: the template requeues that), keeps it alive; the trainer's status is
    # the command's. Handlers are not inherited by the processes it starts.
    lines += [*trainer[:-1], f"trap : {forwarded_signal(PREEMPT_SIGNAL)}", trainer[-1]]
    return {"command": "\n".join(lines) + "\n", "sbatch_options": sbatch_options(params, site), "runtime": runtime}
