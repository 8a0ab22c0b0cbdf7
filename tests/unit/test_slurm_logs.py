"""Batched log reads: the real sh script against real files, framed by a random boundary."""

from __future__ import annotations

import subprocess

from slurmflow.logs import LogRead, complete_lines, parse_read_logs, read_logs_command, tail_lines


def run_local(command: str) -> bytes:
    return subprocess.run(command, shell=True, capture_output=True, check=True).stdout  # noqa: S602


def test_reads_from_offsets_many_files(tmp_path):
    a = tmp_path / "a b $(touch canary).log"
    b = tmp_path / "b.log"
    a.write_bytes(b"line1\nline2\npartial")
    b.write_bytes("é€ unicode\n".encode() + bytes(range(256)))
    missing = tmp_path / "not-yet.log"
    reads = [LogRead(str(a), 6), LogRead(str(b), 0), LogRead(str(missing), 0), LogRead(str(a), 0, 3)]
    command, boundary = read_logs_command(reads)
    chunks = parse_read_logs(reads, run_local(command), boundary)
    assert chunks[0].data == b"line2\npartial" and chunks[0].next_offset == a.stat().st_size
    assert chunks[1].data == b.read_bytes()
    assert chunks[2].size == -1 and chunks[2].data == b"" and chunks[2].next_offset == 0
    assert chunks[3].data == b"lin" and chunks[3].next_offset == 3
    assert not (tmp_path / "canary").exists()


def test_truncated_file_restarts_at_zero(tmp_path):
    f = tmp_path / "x.log"
    f.write_bytes(b"new\n")
    reads = [LogRead(str(f), 100)]
    command, boundary = read_logs_command(reads)
    chunk = parse_read_logs(reads, run_local(command), boundary)[0]
    assert chunk.truncated and chunk.data == b"new\n" and chunk.next_offset == 4


def test_tail_mode(tmp_path):
    f = tmp_path / "x.log"
    f.write_bytes(b"".join(b"line %d\n" % i for i in range(100)))
    reads = [LogRead(str(f), -1, 30)]
    command, boundary = read_logs_command(reads)
    chunk = parse_read_logs(reads, run_local(command), boundary)[0]
    assert chunk.data.endswith(b"line 99\n")
    assert tail_lines(chunk.data, 2) == "line 98\nline 99"


def test_content_that_looks_like_a_boundary_cannot_confuse_the_parser(tmp_path):
    f = tmp_path / "x.log"
    f.write_bytes(b"@@SF 0 5\n\n@@SLURMFLOW-END-0000000000000000@@\n")
    reads = [LogRead(str(f), 0)]
    command, boundary = read_logs_command(reads)
    assert parse_read_logs(reads, run_local(command), boundary)[0].data == f.read_bytes()


def test_complete_lines_carries_partials():
    lines, rest = complete_lines(b"a\nb\npart")
    assert (lines, rest) == (["a", "b"], b"part")
    lines, rest = complete_lines(b"ial\r\n", rest)
    assert (lines, rest) == (["partial"], b"")
