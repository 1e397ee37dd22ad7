"""Slurm host lists and tasks per node, as horovodrun and mpirun need them."""
import re

import pytest

from conftest import run_cli
from hvd_ba.cluster import (HostListError, check_tasks, expand_hostlist, expand_tasks_per_node, horovod_hosts,
                            launch_rank, mpi_hostfile, slots)


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("a[1-2],b3,c[5]", ["a1", "a2", "b3", "c5"]),
    ("rack[1-2]-gpu[1-2]", ["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"]),
    ("gpu-a[1,3]-ib", ["gpu-a1-ib", "gpu-a3-ib"]),
    ("x.y.org,z[0-1].y.org", ["x.y.org", "z0.y.org", "z1.y.org"]),
    ("n[1-2],n[2-3]", ["n1", "n2", "n2", "n3"]),  # Slurm keeps duplicates too
    (" n[1-2] ", ["n1", "n2"]),
])
def test_host_lists_expand_as_scontrol_show_hostnames(text, hosts):
    assert expand_hostlist(text) == hosts


def test_a_large_list_expands_in_order():
    hosts = expand_hostlist("c[0001-1000]")
    assert len(hosts) == 1000 and hosts[0] == "c0001" and hosts[-1] == "c1000"


@pytest.mark.parametrize("text, words", [
    ("n[1-2", "never closed"),
    ("n1-2]", "without '['"),
    ("n[1-[2]]", "nested"),
    ("n[3-1]", "backwards"),
    ("n[a-b]", "not a number"),
    ("n[]", "empty brackets"),
    ("n1,,n2", "empty host name"),
    ("n1,", "empty host name"),
    ("", "empty"),
    ("n 1", "not a host name"),
])
def test_bad_host_lists_name_the_problem(text, words):
    with pytest.raises(HostListError, match=re.escape(words)):
        expand_hostlist(text)


@pytest.mark.parametrize("text, counts", [
    ("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2),8", [1, 3, 3, 8]),
])
def test_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "2x3", "2(3)", "0", "a", "2(x0)"])
def test_bad_tasks_per_node(text):
    with pytest.raises(HostListError):
        expand_tasks_per_node(text)


def test_slots_pair_hosts_with_counts_and_check_the_task_count():
    host_slots = slots("gpu[01-03]", "4(x2),2")
    assert host_slots == [("gpu01", 4), ("gpu02", 4), ("gpu03", 2)]
    assert horovod_hosts(host_slots) == "gpu01:4,gpu02:4,gpu03:2"
    assert mpi_hostfile(host_slots) == "gpu01 slots=4\ngpu02 slots=4\ngpu03 slots=2\n"
    assert slots("n[1-3]", "2") == [("n1", 2), ("n2", 2), ("n3", 2)]  # one count for every node
    check_tasks(host_slots, 10)
    with pytest.raises(HostListError, match="11 tasks requested but the hosts have only 10 slots"):
        check_tasks(host_slots, 11)
    with pytest.raises(HostListError, match="3 hosts but tasks per node '4,2' gives 2 counts"):
        slots("gpu[01-03]", "4,2")


def test_hosts_command_reads_the_slurm_environment(monkeypatch):
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    r = run_cli("hosts", "--np", "4", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "n1:2,n2:2"
    r = run_cli("hosts", "--format", "hostfile", env_extra=env)
    assert r.stdout == "n1 slots=2\nn2 slots=2\n"
    r = run_cli("hosts", "--np", "5", env_extra=env)
    assert r.returncode == 2 and "5 tasks requested but the hosts have only 4 slots" in r.stderr
    r = run_cli("hosts", "--nodelist", "n[1-", "--tasks-per-node", "1")
    assert r.returncode == 2 and "hvd_ba hosts: error: host list 'n[1-': '[' is never closed" in r.stderr


@pytest.mark.parametrize("env, expected", [
    ({"HOROVOD_RANK": "3", "HOROVOD_SIZE": "4"}, (3, 4)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, (1, 2)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (5, 8)),
    ({}, (0, 1)),
])
def test_launch_rank_reads_the_launchers_variables(monkeypatch, env, expected):
    for key in ("HOROVOD_RANK", "HOROVOD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_rank() == expected
