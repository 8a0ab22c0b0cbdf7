# slurmflow: singularity runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_cache=/scratch/alice/images
sf_load_env() {  # export the KEY=VALUE lines of a file; the shell never parses the values
  while IFS= read -r sf_kv || [ -n "$sf_kv" ]; do
    case ${sf_kv%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac
    case $sf_kv in *=*) export "$sf_kv" ;; esac
  done < "$1"
}
sf_img="$sf_cache/singularity/sha256-3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f.sif"
if [ ! -e "$sf_img" ]; then
  mkdir -p "$sf_cache/singularity" || exit 1
  (
    flock -w 3600 9 || { echo "slurmflow: timed out waiting for $sf_img.lock" >&2; exit 1; }
    [ -e "$sf_img" ] && exit 0  # another job finished it while we waited
    echo "slurmflow: preparing $sf_image for singularity (once per digest)" >&2
    sf_tmp="$sf_img.tmp.$$"
    rm -rf "$sf_tmp"
    if (
      sf_load_env /home/alice/.slurmflow/auth/registry.env
      singularity pull --nohttps "$sf_tmp" "docker://$sf_image"
    ); then sf_rc=0; else sf_rc=1; fi
    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi
    mv -f "$sf_tmp" "$sf_img"
  ) 9>"$sf_img.lock" || exit 1
fi
(
  sf_load_env '/scratch/jobs/nightly run 7/.env'
  export SINGULARITYENV_HPCTRAIN_LOG_LEVEL=info
  exec singularity exec --nv --bind '/scratch/jobs/nightly run 7:/scratch/jobs/nightly run 7' --bind /datasets/imagenet:/data:ro --pwd '/scratch/jobs/nightly run 7' "$sf_img" python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
)
