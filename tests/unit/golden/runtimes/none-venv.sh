# slurmflow: none runs the command in /opt/envs/hpctrain
(
  PATH=/opt/envs/hpctrain/bin:"$PATH"; export PATH
  exec srun python -m hpctrain fit --config '/scratch/jobs/nightly run 7/config.yaml'
)
