"""slurmflow triggers."""
