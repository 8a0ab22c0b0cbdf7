"""The typed, JSON-schema-validated Params of the training DAGs (the Trigger form in the UI).

Every Param has a description and a default, so pressing Trigger with the defaults trains a
small model on the local stack. Airflow validates ``conf`` against these schemas when a run is
created (the REST API answers HTTP 400 with the reason), before anything reaches Slurm.
Light on purpose: DAG files import this module at parse time.
"""

from __future__ import annotations

from airflow.sdk import Param

from slurmflow.pipeline.experiments import experiment_configs

TASKS = ("surrogate", "deepcam")
RUNTIMES = ("docker", "podman", "charliecloud", "apptainer", "singularity", "podman-hpc", "enroot", "none")
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SLURM_TIME = r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$"
SLURM_MEM = r"^\d+[KMGT]?$"
SLURM_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
SLURM_BIND = r"^([a-z_]+,)*[a-z_]+(:[0-9A-Fa-fx,]+)?$"  # --cpu-bind / --gpu-bind: closest, map_gpu:0,1
HINTS = ("nomultithread", "multithread", "compute_bound", "memory_bound")
#: sbatch options a user may add by name (Param ``sbatch_extra``) beyond the ones that have a
#: Param: a policy, each one a key of :data:`slurmflow.sbatch.OPTIONS`, whose check applies at
#: preflight. Options the project sets itself (job name, output, signal, array...) are not here.
EXTRA_SBATCH = ("reservation", "mail_type", "mail_user", "begin", "nice", "licenses", "tmp", "mem_per_gpu",
                "cpus_per_gpu", "gres", "time_min", "exclude", "nodelist", "cpu_freq")
#: what any value of ``sbatch_extra`` may contain at trigger time (no quotes, spaces or shell syntax)
EXTRA_VALUE = r"^[A-Za-z0-9_.,:@%+=\[\]-]{1,256}$"
#: one ``overrides`` item: ``--<key>=<value>``, a LightningCLI key (``seed_everything`` or a dotted
#: key of a config section) and a value on one line. The value reaches the job as one argv word
#: (quoted); the LightningCLI parser checks key and type at preflight.
OVERRIDE = r"^--(seed_everything|(trainer|model|data|run)(\.[A-Za-z_][A-Za-z0-9_]*)+)=[^\n\r]{0,2000}$"
#: ``init_from``: a model version, a model alias, or an MLflow run id (32 hex digits)
_MODEL = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
INIT_FROM = rf"^(models:/{_MODEL}/[1-9][0-9]{{0,9}}|models:/{_MODEL}@[A-Za-z_][A-Za-z0-9_-]{{0,254}}|[0-9a-f]{{32}})$"
INIT_MODES = ("resume", "weights")


#: The MongoDB query operators a user may type in a filter (data_query). Everything else with a
#: ``$`` is refused at trigger time: ``$where``, ``$function``, ``$accumulator`` run JavaScript on
#: the server, and ``$expr`` can wrap them.
MONGO_QUERY_OPERATORS = (
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",  # comparison
    "$and", "$or", "$nor", "$not",  # logical
    "$exists", "$type",  # element
    "$regex", "$options", "$mod", "$all", "$elemMatch", "$size",  # evaluation (no JS), arrays
)


def mongo_filter_schema() -> dict:
    """JSON schema of a MongoDB filter that is *data*: field names (not starting with ``$``) and
    the :data:`MONGO_QUERY_OPERATORS`, at any depth. Airflow validates ``conf`` against it when a
    run is created, so a refused operator is an HTTP 400 naming it, before anything runs."""
    key = {"anyOf": [{"pattern": r"^[^$]"}, {"enum": list(MONGO_QUERY_OPERATORS)}],
           "description": "a field name or an allowed query operator"}
    return {
        "propertyNames": key,
        "additionalProperties": {"$ref": "#/$defs/value"},
        "$defs": {
            "filter": {"type": "object", "propertyNames": key, "additionalProperties": {"$ref": "#/$defs/value"}},
            "value": {"anyOf": [
                {"type": ["string", "number", "boolean", "null"]},
                {"type": "array", "items": {"$ref": "#/$defs/value"}},
                {"$ref": "#/$defs/filter"},
            ]},
        },
    }


def optional(pattern: str | None = None, *, enum: tuple[str, ...] | None = None, **kwargs) -> Param:
    """An optional string: ``null`` (an empty field in the form) means the site default.

    The Trigger form treats a field as required unless its type admits ``null``; a ``""``
    default with an "or empty" pattern renders as a required field in error, so the form
    could not be submitted with its own defaults.
    """
    schema: dict = {"type": ["null", "string"], **kwargs}
    if pattern:
        schema["pattern"] = pattern
    if enum:
        schema["enum"] = [None, *enum]
        # the dropdown's label for null (it would read "null")
        schema["values_display"] = {"null": "(site default)", **{v: v for v in enum}}
    return Param(None, **schema)


def model_params(task: str = "surrogate") -> dict[str, Param]:
    """What to train and on which data."""
    return {
        "task": Param(task, type="string", enum=list(TASKS), section="Model",
                      description="Reference task: 'surrogate' (MLP regressor on the Mongo campaign "
                                  "collection) or 'deepcam' (U-Net segmentation of generated climate fields)."),
        "model_name": optional(NAME, section="Model",
                               description="Registered model name in MLflow; empty = slurmflow-<task>."),
        "data_collection": Param("borehole", type="string", pattern=NAME, section="Data",
                                 description="surrogate: MongoDB collection in the 'campaigns' database."),
        "data_query": Param({"valid": True}, type="object", section="Data", **mongo_filter_schema(),
                            description="surrogate: MongoDB filter selecting the training documents "
                                        "(field names and query operators such as $gte, $in; no "
                                        "$where/$function/$expr)."),
        "data_seed": Param(0, type="integer", minimum=0, maximum=2**31 - 1, section="Data",
                           description="deepcam: seed of the generated fields (the data set's identity)."),
    }


def hyperparameters(lr: float = 3e-3, max_epochs: int = 3, batch_size: int = 128, width: int = 64) -> dict[str, Param]:
    """Hyperparameters common to both tasks (overrides of the task's config file)."""
    return {
        "lr": Param(lr, type="number", exclusiveMinimum=0, maximum=1, section="Hyperparameters",
                    description="Learning rate (AdamW)."),
        "max_epochs": Param(max_epochs, type="integer", minimum=1, maximum=1000, section="Hyperparameters",
                            description="Epochs to train."),
        "batch_size": Param(batch_size, type="integer", minimum=1, maximum=65536, section="Hyperparameters",
                            description="Per-process batch size."),
        "width": Param(width, type="integer", minimum=4, maximum=4096, section="Hyperparameters",
                       description="Model width: hidden units per MLP layer (surrogate) or base channels (deepcam)."),
        "seed": Param(42, type="integer", minimum=0, maximum=2**31 - 1, section="Hyperparameters",
                      description="Global seed (weights, shuffling): same seed, same model."),
    }


def slurm_params() -> dict[str, Param]:
    """Resources; empty partition/account mean the site defaults from Airflow Variables."""
    return {
        "cluster": optional(r"^[A-Za-z0-9_.-]{1,250}$", section="Slurm",
                            description="Cluster: the id of its SSH connection; empty = slurm_default. Its "
                                        "settings: Variable slurmflow_cluster_<id> (JSON), else the global ones."),
        "partition": optional(SLURM_NAME, section="Slurm", description="Partition; empty = Variable slurmflow_partition."),
        "account": optional(SLURM_NAME, section="Slurm", description="Account to charge; empty = Variable slurmflow_account."),
        "qos": optional(SLURM_NAME, section="Slurm", description="QOS; empty = the account's default."),
        "nodes": Param(1, type="integer", minimum=1, maximum=1024, section="Slurm", description="Nodes."),
        "ntasks_per_node": Param(1, type="integer", minimum=1, maximum=256, section="Slurm",
                                 description="Processes per node (one per GPU for DDP)."),
        "cpus_per_task": Param(1, type="integer", minimum=1, maximum=256, section="Slurm",
                               description="CPUs per process (data loading threads)."),
        "gpus_per_node": Param(0, type="integer", minimum=0, maximum=16, section="Slurm",
                               description="GPUs per node; 0 trains on CPU."),
        "mem": Param("2G", type="string", pattern=SLURM_MEM, section="Slurm",
                     description="Memory per node, e.g. 2G or 64000M."),
        "time_limit": Param("00:30:00", type="string", pattern=SLURM_TIME, section="Slurm",
                            description="Wall-clock limit, [D-]HH:MM:SS; training checkpoints 60 s before it."),
        "gpus": Param(0, type="integer", minimum=0, maximum=4096, section="Slurm",
                      description="GPUs for the whole job (--gpus), placed by Slurm; set this or "
                                  "gpus_per_node, not both."),
        "exclusive": Param(False, type="boolean", section="Slurm", description="Whole nodes (--exclusive)."),
        "constraint": optional(r"^[A-Za-z0-9_&|,*:.\[\]()!-]{1,256}$", section="Slurm",
                               description="Node features (--constraint), e.g. a100&ib."),
        "hint": optional(enum=HINTS, section="Slurm", description="Task layout (--hint), e.g. nomultithread: "
                                                                   "one task per core."),
        "cpu_bind": optional(SLURM_BIND, section="Slurm",
                             description="Binding of each training process (srun --cpu-bind), e.g. "
                                         "verbose,map_cpu:0,8,16,24."),
        "gpu_bind": optional(SLURM_BIND, section="Slurm",
                             description="GPU binding (--gpu-bind), e.g. closest or map_gpu:0,1,2,3."),
        "distribution": optional(r"^[a-z*]+(:[a-z*]+){0,2}(,[A-Za-z]+)?$", section="Slurm",
                                 description="Task distribution (--distribution), e.g. block:block."),
        "wckey": optional(SLURM_NAME, section="Slurm", description="Workload characterization key (--wckey)."),
        "sbatch_extra": Param({}, type="object", section="Slurm", propertyNames={"enum": list(EXTRA_SBATCH)},
                              additionalProperties={"type": ["string", "integer"], "pattern": EXTRA_VALUE},
                              description="Other sbatch options, by name: " + ", ".join(EXTRA_SBATCH)
                                          + ". Each value is checked against the option's own pattern "
                                            "at preflight."),
        "container_runtime": optional(enum=RUNTIMES, section="Slurm",
                                      description="Container runtime on the cluster; empty = Variable "
                                                  "slurmflow_container_runtime."),
    }


def target_params() -> dict[str, Param]:
    """A quality target that ends training early (MLPerf's "time to train")."""
    return {
        "target_iou": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1, section="Hyperparameters",
                            description="deepcam only: stop at the first validation whose val/iou reaches this "
                                        "(0 < x <= 1; MLPerf HPC DeepCam's target is 0.82) and record the time to "
                                        "it; empty = train every epoch."),
    }


def experiment_params() -> dict[str, Param]:
    """Your own experiment config, free overrides, and continuing a previous experiment."""
    configs = tuple(experiment_configs())
    return {
        "config": optional(enum=configs, section="Experiment",
                           description="An experiment config of training/configs/ (the list is read from the "
                                       "repository when the DAG is parsed); empty = the task's reference "
                                       "config. With a config, its own values hold: of the fields above only "
                                       "seed and max_epochs apply, change the rest with overrides."),
        "overrides": Param([], type="array", maxItems=64, section="Experiment",
                           items={"type": "string", "pattern": OVERRIDE},
                           description="LightningCLI overrides, one per item, e.g. --model.lr=0.001, "
                                       "--data.batch_size=32, --trainer.gradient_clip_val=1.0; applied last. "
                                       "Keys and types are checked by hpctrain's parser at preflight."),
        "init_from": optional(INIT_FROM, section="Experiment",
                              description="Continue a previous experiment: models:/<name>/<version>, "
                                          "models:/<name>@<alias> or an MLflow run id. The job starts from "
                                          "that run's last checkpoint; empty = train from scratch."),
        "init_mode": Param("resume", type="string", enum=list(INIT_MODES), section="Experiment",
                           description="resume: weights, optimizer, scheduler and epoch from the checkpoint "
                                       "(max_epochs counts all epochs, the parent's included, and must be "
                                       "above them); weights: the weights only, a fresh optimizer from epoch 0."),
    }


def train_params() -> dict[str, Param]:
    """All Params of ``train_model``."""
    return draft7({**model_params(), **hyperparameters(), **target_params(), **experiment_params(),
                   **slurm_params()})


#: The JSON Schema dialect of every Param (see :func:`draft7`).
DRAFT_7 = "http://json-schema.org/draft-07/schema#"


def draft7(params: dict[str, Param]) -> dict[str, Param]:
    """Mark each Param's schema as JSON Schema draft 7 (in place; returns ``params``).

    Airflow checks every Param default with ``jsonschema.validate`` whenever a scheduled DAG is
    parsed, and that first checks the schema against its dialect's metaschema: draft 2020-12's
    (jsonschema's default) costs about 4x draft 7's, ~10 ms of each parse of a DAG with 30
    Params (bench/dag_parse.py). Nothing here needs a newer draft: ``$defs`` is only a ``$ref``
    target, and no ``$ref`` has sibling keywords (draft 7 ignores those).
    """
    for param in params.values():
        param.schema["$schema"] = DRAFT_7
    return params


def online_params() -> dict[str, Param]:
    """All Params of ``online_training``: the producer ensemble, the trainer, the allocation.

    The defaults finish in a few minutes on the local stack: 2 replicas x 2 ranks, 20 rounds of
    64 samples every 0.5 s, one trainer rank; 6 tasks of 1 CPU.
    """
    slurm = slurm_params()
    return draft7({
        "model_name": optional(NAME, section="Model",
                               description="Registered model name in MLflow; empty = slurmflow-online."),
        "replicas": Param(2, type="integer", minimum=1, maximum=256, section="Producers",
                          description="Ensemble members (SmartSim: the ensemble's replicas)."),
        "ranks_per_replica": Param(2, type="integer", minimum=2, maximum=64, section="Producers",
                                   description="MPI-style ranks of each member; rank r draws samples around r, "
                                               "labelled r, so this is also the number of classes (>= 2)."),
        "rounds": Param(20, type="integer", minimum=1, maximum=100_000, section="Producers",
                        description="Batches each producer rank puts before it marks itself done."),
        "interval_s": Param(0.5, type="number", minimum=0, maximum=3600, section="Producers",
                            description="Seconds between two batches of one producer (the simulation step)."),
        "samples_per_batch": Param(64, type="integer", minimum=1, maximum=65536, section="Producers",
                                   description="Samples in each produced batch."),
        "features": Param(16, type="integer", minimum=1, maximum=65536, section="Producers",
                          description="Values per sample."),
        "max_buffered_batches": Param(64, type="integer", minimum=1, maximum=1_000_000, section="Producers",
                                      description="Backpressure: producers wait while the store holds this many "
                                                  "batches the trainer has not taken (bounds the store's memory)."),
        "producer_timeout_s": Param(60, type="number", minimum=1, maximum=86400, section="Producers",
                                    description="A producer with no batch, heartbeat or done mark for this long is "
                                                "dead: reported, and training ends with what arrived."),
        "trainer_ranks": Param(1, type="integer", minimum=1, maximum=256, section="Trainer",
                               description="DDP ranks of the trainer (gloo on CPU); each takes a disjoint "
                                           "share of the batches (SmartSim's replica_rank / num_replicas)."),
        "lr": Param(3e-3, type="number", exclusiveMinimum=0, maximum=1, section="Trainer",
                    description="Learning rate (AdamW)."),
        "max_epochs": Param(200, type="integer", minimum=1, maximum=100_000, section="Trainer",
                            description="Upper bound on epochs: training ends earlier, after the epoch that "
                                        "holds every batch once all producers are done (or dead)."),
        "batch_size": Param(64, type="integer", minimum=1, maximum=65536, section="Trainer",
                            description="Rows per training step (per rank)."),
        "width": Param(64, type="integer", minimum=4, maximum=4096, section="Trainer",
                       description="Hidden units of the classifier's MLP."),
        "seed": Param(42, type="integer", minimum=0, maximum=2**31 - 1, section="Trainer",
                      description="Seed of the producers' data and the trainer's weights."),
        "cluster": slurm["cluster"],
        "partition": slurm["partition"],
        "account": slurm["account"],
        "qos": slurm["qos"],
        "cpus_per_task": Param(1, type="integer", minimum=1, maximum=256, section="Slurm",
                               description="CPUs of each task: the store, every producer rank, every trainer rank."),
        "mem_per_cpu": Param("512M", type="string", pattern=SLURM_MEM, section="Slurm",
                             description="Memory per CPU (--mem-per-cpu): each step gets its CPUs' share."),
        "time_limit": Param("00:20:00", type="string", pattern=SLURM_TIME, section="Slurm",
                            description="Wall-clock limit, [D-]HH:MM:SS; the trainer checkpoints 60 s before it."),
        "container_runtime": slurm["container_runtime"],
    })
