"""slurmflow sensors."""
