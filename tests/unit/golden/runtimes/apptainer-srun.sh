# slurmflow: apptainer runs registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_image=registry.example.org:5000/slurmflow/training@sha256:3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f
sf_cache="${SLURMFLOW_IMAGE_CACHE:-$HOME/.cache/slurmflow/images}"
sf_img="$sf_cache/apptainer/sha256-3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f.sif"
if [ ! -e "$sf_img" ]; then
  mkdir -p "$sf_cache/apptainer" || exit 1
  (
    flock -w 3600 9 || { echo "slurmflow: timed out waiting for $sf_img.lock" >&2; exit 1; }
    [ -e "$sf_img" ] && exit 0  # another job finished it while we waited
    echo "slurmflow: preparing $sf_image for apptainer (once per digest)" >&2
    sf_tmp="$sf_img.tmp.$$"
    rm -rf "$sf_tmp"
    if (
      apptainer pull "$sf_tmp" "docker://$sf_image"
    ); then sf_rc=0; else sf_rc=1; fi
    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi
    mv -f "$sf_tmp" "$sf_img"
  ) 9>"$sf_img.lock" || exit 1
fi
srun --kill-on-bad-exit=1 apptainer exec --nv "$sf_img" python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
