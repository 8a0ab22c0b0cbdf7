# slurmflow: charliecloud runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_cache="${SLURMFLOW_IMAGE_CACHE:-$HOME/.cache/slurmflow/images}"
sf_img="$sf_cache/charliecloud/sha256-3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f"
if [ ! -e "$sf_img" ]; then
  mkdir -p "$sf_cache/charliecloud" || exit 1
  (
    flock -w 3600 9 || { echo "slurmflow: timed out waiting for $sf_img.lock" >&2; exit 1; }
    [ -e "$sf_img" ] && exit 0  # another job finished it while we waited
    echo "slurmflow: preparing $sf_image for charliecloud (once per digest)" >&2
    sf_tmp="$sf_img.tmp.$$"
    rm -rf "$sf_tmp"
    if (
      export CH_IMAGE_STORAGE="$sf_tmp.storage"
      ch-image pull "$sf_image" &&
      ch-convert -i ch-image -o dir "$sf_image" "$sf_tmp"
    ); then sf_rc=0; else sf_rc=1; fi
    rm -rf "$sf_tmp.storage"
    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi
    mv -f "$sf_tmp" "$sf_img"
  ) 9>"$sf_img.lock" || exit 1
fi
mkdir -p "$sf_img""${SLURMFLOW_JOB_DIR}" "$sf_img"/data
ch-run --env-no-expand --set-env --set-env="${SLURMFLOW_JOB_DIR}"/.env --set-env=HOME=/tmp --bind="${SLURMFLOW_JOB_DIR}":"${SLURMFLOW_JOB_DIR}" --bind=/datasets:/data --cd="${SLURMFLOW_JOB_DIR}" "$sf_img" -- python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
