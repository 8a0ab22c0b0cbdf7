# slurmflow: podman-hpc runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_cache=/scratch/alice/images
sf_sqdir="$sf_cache/podman-hpc"
sf_migrated() {  # the digest is in the squash dir
  podman-hpc --squash-dir "$sf_sqdir" images --no-trunc --filter readonly=true --format '{{.Repository}}@{{.Digest}}' 2>/dev/null | grep -qxF "$sf_image"
}
if ! sf_migrated; then
  mkdir -p "$sf_sqdir" || exit 1
  (
    flock -w 3600 9 || { echo "slurmflow: timed out waiting for the image lock" >&2; exit 1; }
    sf_migrated && exit 0  # another job migrated it while we waited
    echo "slurmflow: pulling $sf_image and migrating it to $sf_sqdir (once per digest)" >&2
    DOCKER_CONFIG=/home/alice/.slurmflow/auth podman-hpc --squash-dir "$sf_sqdir" pull -q --tls-verify=false --authfile /home/alice/.slurmflow/auth/config.json "$sf_image" >/dev/null || exit 1
    sf_migrated || { echo "slurmflow: podman-hpc did not migrate $sf_image to $sf_sqdir" >&2; exit 1; }
    # the node-local copy is not needed: every job runs the squashed image
    podman-hpc --squash-dir "$sf_sqdir" rmi "$sf_image" >/dev/null 2>&1 || true
  ) 9>"$sf_sqdir/.slurmflow.lock" || exit 1
fi
podman-hpc --squash-dir "$sf_sqdir" run --rm --network host --userns keep-id --user "$(id -u):$(id -g)" --shm-size 1g --gpu -e HOME=/tmp -v '/scratch/jobs/nightly run 7:/scratch/jobs/nightly run 7' -v /datasets/imagenet:/data:ro -w '/scratch/jobs/nightly run 7' --env-file '/scratch/jobs/nightly run 7/.env' -e SLURM_JOB_ID -e SLURM_JOB_NAME -e SLURM_JOB_PARTITION -e SLURM_JOB_ACCOUNT -e SLURM_CLUSTER_NAME -e SLURM_JOB_NUM_NODES -e SLURM_NNODES -e SLURM_JOB_NODELIST -e SLURM_NODELIST -e SLURMD_NODENAME -e SLURM_NTASKS -e SLURM_NTASKS_PER_NODE -e SLURM_TASKS_PER_NODE -e SLURM_CPUS_PER_TASK -e SLURM_CPUS_ON_NODE -e SLURM_GPUS_ON_NODE -e SLURM_MEM_PER_NODE -e SLURM_PROCID -e SLURM_LOCALID -e SLURM_NODEID -e SLURM_STEP_ID -e SLURM_STEP_NODELIST -e SLURM_STEP_NUM_NODES -e SLURM_STEP_NUM_TASKS -e SLURM_ARRAY_JOB_ID -e SLURM_ARRAY_TASK_ID -e SLURM_ARRAY_TASK_COUNT -e SLURM_ARRAY_TASK_MIN -e SLURM_ARRAY_TASK_MAX -e SLURM_RESTART_COUNT -e SLURM_SUBMIT_DIR -e HPCTRAIN_JOB_DIR -e MLFLOW_TRACKING_PASSWORD -e HPCTRAIN_LOG_LEVEL=info "$sf_image" python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
