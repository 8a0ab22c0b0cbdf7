"""slurmflow hooks."""
