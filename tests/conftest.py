"""Shared fixtures: where the local stack (``make up``) lives and how to reach it.

``make up`` writes ``.stack/stack.env`` (KEY=value lines): the addresses and generated dev
credentials of every local service. Integration tests read it through :func:`stack_env`;
when the stack is not up they fail with a clear message instead of skipping, so CI cannot go
green without having exercised the real services.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK_DIR = Path(os.environ.get("SLURMFLOW_STACK_DIR", REPO / ".stack"))


def read_stack_env() -> dict[str, str]:
    """Parse ``.stack/stack.env``; raise a readable error when the stack was never started."""
    path = STACK_DIR / "stack.env"
    if not path.exists():
        raise RuntimeError(f"{path} not found: start the local stack with `make up` first")
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    """Addresses and dev credentials of the running local stack."""
    try:
        return read_stack_env()
    except RuntimeError as exc:
        pytest.fail(str(exc))
