# slurmflow: docker runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
if ! docker image inspect "$sf_image" >/dev/null 2>&1; then
  echo "slurmflow: pulling $sf_image" >&2
  docker --config /home/alice/.slurmflow/auth pull -q "$sf_image" >/dev/null || exit 1
fi
sf_gpus=all
if [ -n "${SLURM_JOB_GPUS:-}" ]; then sf_gpus="\"device=$SLURM_JOB_GPUS\""; fi
docker run --rm --init --network host --ipc host --user "$(id -u):$(id -g)" --label "slurmflow.slurm_job_id=${SLURM_JOB_ID:-none}" --gpus "$sf_gpus" -e HOME=/tmp -v '/scratch/jobs/nightly run 7:/scratch/jobs/nightly run 7' -v /datasets/imagenet:/data:ro -w '/scratch/jobs/nightly run 7' --env-file '/scratch/jobs/nightly run 7/.env' -e HPCTRAIN_JOB_DIR -e MLFLOW_TRACKING_PASSWORD -e HPCTRAIN_LOG_LEVEL=info "$sf_image" python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
