"""The chaos harness (``make chaos``): real ``train_model`` runs on the local stack, a fault
injected at a random moment inside a phase, and what the product did about it, recorded.

- :mod:`scripts.chaos.table`: the faults, the phases and when in a phase a fault lands (data);
- :mod:`scripts.chaos.phases`: where a run is, and when it moves again (pure);
- :mod:`scripts.chaos.inject`: doing and undoing the faults (supervisord, signals);
- :mod:`scripts.chaos.observe`: what Slurm ran, the logs, the secrets scan (observation only);
- :mod:`scripts.chaos.trial`: one trial, start to record;
- :mod:`scripts.chaos.report`: the figures and docs/RELIABILITY.md's table (pure);
- ``python -m scripts.chaos``: the command line.

It reuses the e2e building blocks (tests/e2e/helpers.py: ``kill_tree``, ``wait_running``,
``trigger_records``, ``streamed_lines``) so that a fault means the same in a test and here.
"""
