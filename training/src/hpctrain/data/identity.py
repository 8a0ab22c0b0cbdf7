"""What a run trained on, recorded so that two runs can be compared and a result reproduced.

File sources are identified by the SHA-256 of their bytes; MongoDB sources by where and what was
queried (credentials stripped), when, how many documents came back, and a hash of their canonical
JSON; generated data by its generator, parameters and a hash of the generated tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks.

    :param path: the file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def redact_uri(uri: str) -> str:
    """Drop ``user:password@`` from a URI (``mongodb://u:p@h/db`` -> ``mongodb://h/db``).

    Manifests and MLflow params are readable by everyone on the project; credentials never go
    there. Query options such as ``authSource`` stay: they are not secret and tell how to
    reconnect.

    :param uri: a URI, possibly with credentials.
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def hash_documents(documents: Iterable[Mapping[str, Any]]) -> tuple[str, int]:
    """SHA-256 over the canonical extended JSON of each document, in the order given.

    Extended JSON (``bson.json_util``) keeps types apart that plain JSON would merge
    (ObjectId vs string, datetime vs string), so a type change in the source changes the hash.

    :param documents: documents in a deterministic order (the source sorts by ``_id``).
    :returns: ``(hex digest, document count)``.
    """
    from bson import json_util

    digest = hashlib.sha256()
    count = 0
    options = json_util.CANONICAL_JSON_OPTIONS
    for doc in documents:
        digest.update(json_util.dumps(doc, json_options=options, sort_keys=True).encode())
        digest.update(b"\n")
        count += 1
    return digest.hexdigest(), count


def hash_tensors(*tensors: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and bytes of each tensor (for generated data sets)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
