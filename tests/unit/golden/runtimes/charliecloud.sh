# slurmflow: charliecloud runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_cache=/scratch/alice/images
sf_load_env() {  # export the KEY=VALUE lines of a file; the shell never parses the values
  while IFS= read -r sf_kv || [ -n "$sf_kv" ]; do
    case ${sf_kv%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac
    case $sf_kv in *=*) export "$sf_kv" ;; esac
  done < "$1"
}
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
      sf_load_env /home/alice/.slurmflow/auth/registry.env
      export CH_IMAGE_STORAGE="$sf_tmp.storage"
      ch-image pull --tls-no-verify "$sf_image" &&
      ch-convert -i ch-image -o dir "$sf_image" "$sf_tmp"
    ); then sf_rc=0; else sf_rc=1; fi
    rm -rf "$sf_tmp.storage"
    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi
    mv -f "$sf_tmp" "$sf_img"
  ) 9>"$sf_img.lock" || exit 1
fi
sf_drv=$(cat /sys/module/nvidia/version 2>/dev/null || echo none)
sf_base="$sf_img"
sf_img="$sf_base.nvidia-$sf_drv"
if [ ! -e "$sf_img" ]; then
  mkdir -p "$sf_cache/charliecloud" || exit 1
  (
    flock -w 3600 9 || { echo "slurmflow: timed out waiting for $sf_img.lock" >&2; exit 1; }
    [ -e "$sf_img" ] && exit 0  # another job finished it while we waited
    echo "slurmflow: preparing $sf_image for charliecloud (once per digest)" >&2
    sf_tmp="$sf_img.tmp.$$"
    rm -rf "$sf_tmp"
    if (
      cp -a "$sf_base" "$sf_tmp" &&
      ch-fromhost --nvidia "$sf_tmp"
    ); then sf_rc=0; else sf_rc=1; fi
    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi
    mv -f "$sf_tmp" "$sf_img"
  ) 9>"$sf_img.lock" || exit 1
fi
mkdir -p "$sf_img"/data "$sf_img"'/scratch/jobs/nightly run 7'
ch-run --env-no-expand --set-env '--set-env=/scratch/jobs/nightly run 7/.env' --set-env=HOME=/tmp --set-env=HPCTRAIN_LOG_LEVEL=info '--bind=/scratch/jobs/nightly run 7:/scratch/jobs/nightly run 7' --bind=/datasets/imagenet:/data '--cd=/scratch/jobs/nightly run 7' "$sf_img" -- python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
