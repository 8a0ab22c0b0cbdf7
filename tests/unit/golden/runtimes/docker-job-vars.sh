# slurmflow: docker runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
if ! docker image inspect "$sf_image" >/dev/null 2>&1; then
  echo "slurmflow: pulling $sf_image" >&2
  docker pull -q "$sf_image" >/dev/null || exit 1
fi
docker run --rm --init --network host --ipc host --user "$(id -u):$(id -g)" --label "slurmflow.slurm_job_id=${SLURM_JOB_ID:-none}" -e HOME=/tmp -v "${SLURMFLOW_JOB_DIR}":"${SLURMFLOW_JOB_DIR}" -v /datasets:/data:ro -w "${SLURMFLOW_JOB_DIR}" --env-file "${SLURMFLOW_JOB_DIR}"/.env -e SLURMFLOW_JOB_DIR -e HPCTRAIN_JOB_DIR "$sf_image" python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
