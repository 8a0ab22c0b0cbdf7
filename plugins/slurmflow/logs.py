"""Reading job logs on the login node from a byte offset, many files in one SSH command.

Pure module. The shared poller reads the new bytes of every followed log in one ``sh -c``
per poll (file I/O on the login node, no Slurm RPC). Each file's bytes are framed by a header
line and a random boundary, so byte counts never have to be trusted across a file that grows
while it is being read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from slurmflow.commands import new_boundary, to_shell

#: Read at most this much of one log per poll: a chatty job cannot flood the task log.
DEFAULT_CHUNK_BYTES = 64 * 1024
#: How much of the end of a log goes into a failure message.
DEFAULT_TAIL_BYTES = 8 * 1024

_HEADER_RE = re.compile(rb"@@SF (\d+) (-?\d+)\n")


@dataclass(frozen=True)
class LogRead:
    """One file to read.

    :param path: absolute path on the login node.
    :param offset: byte offset already seen; ``-1`` means "the last ``limit`` bytes" (a tail).
    :param limit: the most bytes to return.
    """

    path: str
    offset: int = 0
    limit: int = DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class LogChunk:
    """What came back for one :class:`LogRead`.

    :param size: the file's size when read; ``-1`` when it does not exist (yet).
    :param data: the bytes read.
    :param next_offset: where the next read should start.
    :param truncated: the file shrank below the offset (rewritten, e.g. a requeue without
        ``--open-mode=append``); reading restarted at 0.
    """

    path: str
    size: int
    data: bytes
    next_offset: int
    truncated: bool = False

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


# $1 = path, $2 = offset (-1: tail), $3 = limit, $4 = index, $5 = boundary.
_READ_ONE = (
    's=$(stat -c %s -- "$1" 2>/dev/null || echo -1); '
    'printf "@@SF %s %s\\n" "$4" "$s"; '
    'if [ "$s" -ge 0 ]; then '
    'if [ "$2" -lt 0 ]; then tail -c "$3" -- "$1"; '
    'else o=$2; [ "$s" -lt "$o" ] && o=0; '
    'if [ "$s" -gt "$o" ]; then n=$((s - o)); [ "$n" -gt "$3" ] && n=$3; '
    'tail -c +$((o + 1)) -- "$1" | head -c "$n"; fi; fi; fi; '
    'printf "\\n%s\\n" "$5"'
)


def read_logs_command(reads: Sequence[LogRead], boundary: str | None = None) -> tuple[str, str]:
    """The shell command reading every file in ``reads``; returns ``(command, boundary)``.

    Each path is passed as a quoted positional argument of a small function, never spliced
    into the script.
    """
    boundary = boundary or new_boundary()
    calls = []
    for index, read in enumerate(reads):
        calls.append(
            "r "
            + to_shell([read.path, str(int(read.offset)), str(max(int(read.limit), 0)), str(index), boundary])
        )
    script = "r() { " + _READ_ONE + "; }; " + "; ".join(calls) if calls else "true"
    return to_shell(["sh", "-c", script]), boundary


def parse_read_logs(reads: Sequence[LogRead], stdout: bytes, boundary: str) -> list[LogChunk]:
    """Split the command's output back into one :class:`LogChunk` per read (input order).

    :raises ValueError: when a file's frame is missing (output cut short).
    """
    chunks: list[LogChunk] = []
    marker = b"\n" + boundary.encode() + b"\n"
    pos = 0
    for index, read in enumerate(reads):
        header = _HEADER_RE.match(stdout, pos)
        if not header or int(header.group(1)) != index:
            raise ValueError(f"log read output malformed at file {index} ({read.path})")
        end = stdout.find(marker, header.end())
        if end < 0:
            raise ValueError(f"log read output cut short at file {index} ({read.path})")
        size = int(header.group(2))
        data = stdout[header.end() : end]
        pos = end + len(marker)
        if read.offset < 0:
            next_offset = max(size, 0)
            truncated = False
        else:
            truncated = 0 <= size < read.offset
            start = 0 if truncated else read.offset
            next_offset = start + len(data)
        chunks.append(LogChunk(read.path, size, data, next_offset, truncated))
    return chunks


def complete_lines(chunk: bytes, carry: bytes = b"") -> tuple[list[str], bytes]:
    """Split bytes into whole lines, keeping an unfinished last line for the next chunk.

    :return: ``(lines, rest)``; ``rest`` starts the next call's ``carry``.
    """
    data = carry + chunk
    if not data:
        return [], b""
    *whole, rest = data.split(b"\n")
    return [line.decode("utf-8", errors="replace").rstrip("\r") for line in whole], rest


def tail_lines(data: bytes, lines: int) -> str:
    """The last ``lines`` lines of a tail read (the first, possibly partial, line dropped)."""
    text = data.decode("utf-8", errors="replace")
    parts = text.splitlines()
    return "\n".join(parts[-lines:])
