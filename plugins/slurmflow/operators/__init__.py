"""slurmflow operators."""
