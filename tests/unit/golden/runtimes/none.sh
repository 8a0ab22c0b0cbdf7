# slurmflow: none runs the command in the cluster Python on PATH
sf_load_env() {  # export the KEY=VALUE lines of a file; the shell never parses the values
  while IFS= read -r sf_kv || [ -n "$sf_kv" ]; do
    case ${sf_kv%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac
    case $sf_kv in *=*) export "$sf_kv" ;; esac
  done < "$1"
}
(
  sf_load_env '/scratch/jobs/nightly run 7/.env'
  export HPCTRAIN_LOG_LEVEL=info
  cd '/scratch/jobs/nightly run 7' || exit 1
  exec python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
)
