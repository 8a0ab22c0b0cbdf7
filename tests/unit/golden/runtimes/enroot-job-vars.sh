# slurmflow: enroot runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_cache="${SLURMFLOW_IMAGE_CACHE:-$HOME/.cache/slurmflow/images}"
sf_load_env() {  # export the KEY=VALUE lines of a file; the shell never parses the values
  while IFS= read -r sf_kv || [ -n "$sf_kv" ]; do
    case ${sf_kv%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac
    case $sf_kv in *=*) export "$sf_kv" ;; esac
  done < "$1"
}
sf_img="$sf_cache/enroot/sha256-3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f.sqsh"
if [ ! -e "$sf_img" ]; then
  mkdir -p "$sf_cache/enroot" || exit 1
  (
    flock -w 3600 9 || { echo "slurmflow: timed out waiting for $sf_img.lock" >&2; exit 1; }
    [ -e "$sf_img" ] && exit 0  # another job finished it while we waited
    echo "slurmflow: preparing $sf_image for enroot (once per digest)" >&2
    sf_tmp="$sf_img.tmp.$$"
    rm -rf "$sf_tmp"
    if (
      enroot import --output "$sf_tmp" 'docker://registry.example.org:5000#slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f'
    ); then sf_rc=0; else sf_rc=1; fi
    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi
    mv -f "$sf_tmp" "$sf_img"
  ) 9>"$sf_img.lock" || exit 1
fi
(
  sf_load_env "${SLURMFLOW_JOB_DIR}"/.env
  exec srun --container-image="$sf_img" --container-mounts="${SLURMFLOW_JOB_DIR}":"${SLURMFLOW_JOB_DIR}",/datasets:/data:ro --container-workdir="${SLURMFLOW_JOB_DIR}" --container-env=SLURMFLOW_JOB_DIR,HPCTRAIN_JOB_DIR,MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD,MONGO_URI python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
)
