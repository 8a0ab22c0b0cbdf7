# slurmflow: docker runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
if ! docker image inspect "$sf_image" >/dev/null 2>&1; then
  echo "slurmflow: pulling $sf_image" >&2
  docker --config /home/alice/.slurmflow/auth pull -q "$sf_image" >/dev/null || exit 1
fi
sf_gpus=all
if [ -n "${SLURM_JOB_GPUS:-}" ]; then sf_gpus="\"device=$SLURM_JOB_GPUS\""; fi
docker run --rm --init --network host --ipc host --user "$(id -u):$(id -g)" --label "slurmflow.slurm_job_id=${SLURM_JOB_ID:-none}" --gpus "$sf_gpus" -e HOME=/tmp -v '/scratch/jobs/nightly run 7:/scratch/jobs/nightly run 7' -v /datasets/imagenet:/data:ro -w '/scratch/jobs/nightly run 7' --env-file '/scratch/jobs/nightly run 7/.env' -e SLURM_JOB_ID -e SLURM_JOB_NAME -e SLURM_JOB_PARTITION -e SLURM_JOB_ACCOUNT -e SLURM_CLUSTER_NAME -e SLURM_JOB_NUM_NODES -e SLURM_NNODES -e SLURM_JOB_NODELIST -e SLURM_NODELIST -e SLURMD_NODENAME -e SLURM_NTASKS -e SLURM_NTASKS_PER_NODE -e SLURM_TASKS_PER_NODE -e SLURM_CPUS_PER_TASK -e SLURM_CPUS_ON_NODE -e SLURM_GPUS_ON_NODE -e SLURM_MEM_PER_NODE -e SLURM_PROCID -e SLURM_LOCALID -e SLURM_NODEID -e SLURM_STEP_ID -e SLURM_STEP_NODELIST -e SLURM_STEP_NUM_NODES -e SLURM_STEP_NUM_TASKS -e SLURM_ARRAY_JOB_ID -e SLURM_ARRAY_TASK_ID -e SLURM_ARRAY_TASK_COUNT -e SLURM_ARRAY_TASK_MIN -e SLURM_ARRAY_TASK_MAX -e SLURM_RESTART_COUNT -e SLURM_SUBMIT_DIR -e HPCTRAIN_JOB_DIR -e MLFLOW_TRACKING_PASSWORD -e HPCTRAIN_LOG_LEVEL=info "$sf_image" python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
