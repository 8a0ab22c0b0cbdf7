"""The local cluster's two compute nodes: ``local1`` on the host, ``local2`` in a network namespace.

Slurm reaches every node at its ``NodeAddr`` on the one ``SlurmdPort``, and a multi-node step
needs the nodes to reach each other (srun's I/O, the step's completion tree). Two slurmd on one
host therefore need two addresses: ``local2``'s slurmd runs inside a network namespace
(:data:`NETNS`) joined to the host by a veth pair, ``local1``'s on the host side of that pair. Both
addresses are private and exist only on this machine; nothing is routed anywhere else.

The nodes share everything else with the host, as nodes of a real site share their parallel
filesystem and site services: the file system (job directories, munge's socket), and the Docker
daemon, whose host-network containers run in the host's namespace, where every stack service is
reachable on 127.0.0.1. A job step of ``local2`` itself (the shell around the container, a
daemonless runtime's container) is on ``local2``'s network, which reaches only the nodes: the
docker runtime (the stack's default) is the one that reaches MLflow and MongoDB from both nodes.
Single-node jobs go to ``local1`` while it has room (its lower ``Weight`` in slurm.conf).

Why a namespace rather than a container running slurmd: the namespace reuses the host's own
Slurm binaries (no second copy of 22.05 to keep at the controller's version), its munge socket
and key, and the job filesystem at the same paths, which is what a real node shares with the
login node; a container would need all three mounted in and an image built for it.

The node names resolve through a marked block in ``/etc/hosts`` (which Docker copies into
host-network containers), so ``SLURM_JOB_NODELIST``'s first name is a usable ``MASTER_ADDR``.
``make down`` deletes the namespace (and with it the veth pair) and the block.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

NETNS = "slurmflow-local2"
#: The veth pair's ends: the host's (local1's address) and the one moved into :data:`NETNS`.
HOST_LINK, NODE_LINK = "sf-local1", "sf-local2"
PREFIX = 24
#: node name -> address (``NodeAddr`` in slurm.conf, the ``/etc/hosts`` block).
ADDRESSES = {"local1": "10.77.0.1", "local2": "10.77.0.2"}
HOSTS = Path("/etc/hosts")
_BEGIN, _END = "# slurmflow local stack: compute nodes (begin)", "# slurmflow local stack: compute nodes (end)"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"node network: `ip {' '.join(args)}` failed: {out.stderr.strip()}")
    return out


def _in_node(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _ip("netns", "exec", NETNS, "ip", *args, check=check)


def slurmd_command(node: str) -> list[str]:
    """The foreground slurmd of ``node``, inside its namespace for ``local2``.

    ``nsenter --net`` and not ``ip netns exec``: the latter also gives the process a mount
    namespace with a fresh /sys, without the cgroup filesystem slurmd needs at start."""
    slurmd = ["/usr/sbin/slurmd", "-D", "-N", node]
    return slurmd if node == "local1" else ["nsenter", f"--net=/run/netns/{NETNS}", *slurmd]


def network_up() -> None:
    """Create the namespace, the veth pair and the addresses, and write the hosts block; each step
    only when missing (``make up`` runs any number of times)."""
    if NETNS not in _ip("netns", "list").stdout.split():
        _ip("netns", "add", NETNS)
    if _ip("link", "show", HOST_LINK, check=False).returncode != 0:
        _ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK, "netns", NETNS)
    host_addr, node_addr = ADDRESSES["local1"], ADDRESSES["local2"]
    if f"{host_addr}/" not in _ip("-4", "addr", "show", HOST_LINK).stdout:
        _ip("addr", "add", f"{host_addr}/{PREFIX}", "dev", HOST_LINK)
    if f"{node_addr}/" not in _in_node("-4", "addr", "show", NODE_LINK).stdout:
        _in_node("addr", "add", f"{node_addr}/{PREFIX}", "dev", NODE_LINK)
    _ip("link", "set", HOST_LINK, "up")
    _in_node("link", "set", NODE_LINK, "up")
    _in_node("link", "set", "lo", "up")
    write_hosts(HOSTS)


def network_down() -> None:
    """Delete the namespace (the veth pair goes with it) and the hosts block."""
    if NETNS in _ip("netns", "list", check=False).stdout.split():
        _ip("netns", "delete", NETNS, check=False)
    _ip("link", "delete", HOST_LINK, check=False)  # only left if the namespace was deleted by hand
    if HOSTS.exists():
        HOSTS.write_text(without_block(HOSTS.read_text()))


def hosts_block() -> str:
    return "\n".join([_BEGIN, *(f"{addr} {node}" for node, addr in ADDRESSES.items()), _END]) + "\n"


def without_block(text: str) -> str:
    """``text`` (an /etc/hosts) without our block."""
    lines, keep, inside = text.splitlines(keepends=True), [], False
    for line in lines:
        if line.strip() == _BEGIN:
            inside = True
        elif line.strip() == _END:
            inside = False
        elif not inside:
            keep.append(line)
    return "".join(keep)


def write_hosts(path: Path) -> None:
    """Put the block into ``path``, replacing an older one. Written in place, not renamed over:
    /etc/hosts may be a bind mount (containers, sandboxes)."""
    text = without_block(path.read_text())
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(text + hosts_block())
