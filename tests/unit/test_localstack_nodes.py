"""The local cluster's second node: its slurmd in a namespace, its address, the hosts block."""

from __future__ import annotations

from scripts.localstack import config, nodes
from scripts.localstack.services import services


def test_hosts_block_is_written_once_and_removed_whole(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.9 other")  # no final newline: ours still goes on its own line
    nodes.write_hosts(hosts)
    nodes.write_hosts(hosts)  # make up again: still one block
    text = hosts.read_text()
    assert text.count("10.77.0.2 local2") == 1 and text.startswith("127.0.0.1 localhost\n10.0.0.9 other\n")
    assert nodes.without_block(text) == "127.0.0.1 localhost\n10.0.0.9 other\n"


def test_slurm_conf_has_two_nodes_at_their_addresses_in_every_partition(tmp_path):
    dest = tmp_path / "slurm.conf"
    config.render("slurm.conf", dest)
    lines = dest.read_text().splitlines()
    node_lines = {line.split()[0]: line for line in lines if line.startswith("NodeName=")}
    assert set(node_lines) == {"NodeName=local1", "NodeName=local2"}
    for node, addr in nodes.ADDRESSES.items():
        assert f"NodeAddr={addr}" in node_lines[f"NodeName={node}"]
    assert "Weight=1 " in node_lines["NodeName=local1"] and "Weight=10 " in node_lines["NodeName=local2"]
    # local2 reaches the controller only at local1's end of the veth pair, not at 127.0.0.1
    assert any(line.startswith("SlurmctldHost=") and nodes.ADDRESSES["local1"] in line for line in lines)
    partitions = [line for line in lines if line.startswith("PartitionName=")]
    assert partitions and all(" Nodes=local1,local2 " in line for line in partitions)
    # two slurmd on one host: a spool folder, pid file and log of their own
    assert all("%n" in line for line in lines if line.startswith(("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile")))


def test_second_slurmd_runs_inside_its_namespace():
    by_name = {s.name: s for s in services("local")}
    assert by_name["slurmd"].command == ["/usr/sbin/slurmd", "-D", "-N", "local1"]
    assert by_name["slurmd-local2"].command[:2] == ["nsenter", f"--net=/run/netns/{nodes.NETNS}"]
    assert by_name["slurmd-local2"].command[-2:] == ["-N", "local2"]
    assert by_name["slurmd-local2"].env == by_name["slurmd"].env  # a changed slurm.conf restarts both
