"""Removing credentials from anything that is logged, stored in a manifest, or sent to MLflow."""

from __future__ import annotations

from typing import Any

from hpctrain.data.identity import redact_uri

_SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "credential")


def redact(value: Any, key: str = "") -> Any:
    """Copy ``value`` with secret-looking keys masked and credentials stripped from URIs.

    :param value: a JSON-like structure (dicts, lists, scalars).
    :param key: the key ``value`` is stored under (decides masking).
    """
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if any(word in key.lower() for word in _SECRET_WORDS):
            return "***"
        if "://" in value and "@" in value:
            return redact_uri(value)
    return value
