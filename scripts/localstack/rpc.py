"""XML-RPC client of the stack's supervisord, over its unix socket (``.stack/run/supervisor.sock``)."""

from __future__ import annotations

import xmlrpc.client
from http.client import HTTPConnection
from pathlib import Path
from socket import AF_UNIX, SOCK_STREAM, socket

from .config import STACK

SUPERVISOR_SOCK = STACK / "run" / "supervisor.sock"


class _UnixHTTP(HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost")
        self.sock_path = path

    def connect(self) -> None:
        self.sock = socket(AF_UNIX, SOCK_STREAM)
        self.sock.connect(str(self.sock_path))


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.sock_path = path

    def make_connection(self, host):
        return _UnixHTTP(self.sock_path)


def supervisor(sock: Path = SUPERVISOR_SOCK):
    """XML-RPC proxy to our supervisord (raises OSError when it is not running)."""
    proxy = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(sock))
    proxy.supervisor.getState()
    return proxy.supervisor


def running_supervisor(sock: Path = SUPERVISOR_SOCK):
    """:func:`supervisor`, or None when none is running."""
    try:
        return supervisor(sock)
    except (OSError, xmlrpc.client.Error):
        return None
