"""Slurm host lists and tasks per node, as horovodrun and mpirun need them."""
import os
import re

import pytest

from helpers import run_cli
from hvd_ba.cluster import (HostListError, check_tasks, expand_hostlist, expand_tasks_per_node, horovod_hosts,
                            launch_rank, mpi_hostfile, slots, Launch, launch_info, rank_share,
                            loader_split, oversubscribed, compact, settings_words, rank_cores,
                            core_order, cores_per_task)


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
@pytest.mark.unit
def test_host_lists_expand_as_scontrol_show_hostnames(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.unit
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
@pytest.mark.unit
def test_bad_host_lists_name_the_problem(text, words):
    with pytest.raises(HostListError, match=re.escape(words)):
        expand_hostlist(text)


@pytest.mark.parametrize("text, counts", [
    ("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2),8", [1, 3, 3, 8]),
])
@pytest.mark.unit
def test_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "2x3", "2(3)", "0", "a", "2(x0)"])
def test_bad_tasks_per_node(text):
    with pytest.raises(HostListError):
        expand_tasks_per_node(text)


@pytest.mark.unit
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


@pytest.mark.integration
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


# The variables each launcher left in a rank's environment, as measured on the local Slurm with
# 2 nodes x 2 tasks (cluster-realities.md): ranks that mpirun forks inherit its node daemon's srun
# task (SLURM_PROCID = node index, SLURM_LOCALID 0), horovodrun's ranks the batch step's.
SRUN_RANK_3 = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
               "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_NODEID": "1", "PMIX_RANK": "3",
               "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
MPIRUN_RANK_3 = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "1",
                 "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                 "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "3"}
HOROVODRUN_RANK_3 = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "HOROVOD_RANK": "3",
                     "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}


@pytest.mark.parametrize("env, expected", [
    (HOROVODRUN_RANK_3, Launch("horovodrun", 3, 4, 1, 2)),
    (MPIRUN_RANK_3, Launch("mpirun", 3, 4, 1, 2, pmi=True)),
    (SRUN_RANK_3, Launch("srun", 3, 4, 1, 2, pmi=True)),
    ({**SRUN_RANK_3, "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "3,1"}, Launch("srun", 3, 4, 1, 3, pmi=True)),
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}, Launch("mpi", 5, 8, 1, 4, True)),
    # A process the batch script starts itself (no job step, no launcher): alone.
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, Launch("alone", 0, 1, 0, 1)),
    ({}, Launch("alone", 0, 1, 0, 1)),
])
@pytest.mark.unit
def test_launch_info_asks_the_launcher_that_started_the_process(env, expected):
    assert launch_info(env) == expected
    assert launch_info(env).mpi == (expected.launcher in ("mpirun", "mpi") or "PMIX_RANK" in env)


@pytest.mark.unit
def test_launch_rank_is_launch_infos_rank_and_world(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("HOROVOD_", "OMPI_", "PMI", "SLURM_", "MPI_")):
            monkeypatch.delenv(key)
    for key, value in MPIRUN_RANK_3.items():
        monkeypatch.setenv(key, value)
    assert launch_rank() == (3, 4)


@pytest.mark.parametrize("env, horovod_local_rank, problem", [
    # The measured failure: mpirun's second rank on a node, whose inherited SLURM_LOCALID is 0.
    (MPIRUN_RANK_3, 1, None),
    (MPIRUN_RANK_3, 0, "rank 3: Horovod local rank 0 != OMPI_COMM_WORLD_LOCAL_RANK 1 of mpirun"),
    (SRUN_RANK_3, 1, None),
    (SRUN_RANK_3, 0, "rank 3: Horovod local rank 0 != SLURM_LOCALID 1 of srun"),
    (HOROVODRUN_RANK_3, 1, None),
    ({}, 0, None),
])
@pytest.mark.unit
def test_horovods_local_rank_is_checked_against_the_launcher_that_started_the_rank(env, horovod_local_rank, problem):
    from hvd_ba.dist import local_rank_problem

    found = local_rank_problem(launch_info(env), 3, horovod_local_rank)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem))


@pytest.mark.parametrize("mask, local_rank, local_size, per_task, share", [
    ([0, 1], 0, 2, 1, [0]),            # horovodrun / mpirun --bind-to none, 2 ranks x 1 core
    ([0, 1], 1, 2, 1, [1]),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, 4, 2, [4, 5]),
    ([0, 1, 2, 3], 1, 2, None, None),  # no Slurm allocation: left as launched
    ([4, 5], 0, 1, 2, None),           # srun with -c: the mask is the share already
    ([0], 0, 1, 2, None),              # srun --exact without -c: one core of two; cannot widen
    ([0, 1], 1, 2, 2, None),           # the mask cannot hold every local rank's share: left alone
    ([0, 1, 2, 3, 4, 5, 6, 7], 0, 2, 2, None),  # wider than the node's allocation (ssh, no cgroup): left
    ([0, 1, 2], 0, 1, None, None),     # alone: keeps all
])
@pytest.mark.unit
def test_rank_share(mask, local_rank, local_size, per_task, share):
    assert rank_share(mask, local_rank, local_size, per_task) == share


@pytest.mark.unit
def test_rank_cores_counts_an_unbound_shared_mask_once_per_rank():
    assert rank_cores([0, 1], 2, None) == 1       # horovodrun -np 2 on a 2-core laptop
    assert rank_cores([0, 1, 2, 3], 1, None) == 4
    assert rank_cores([0], 2, 2) == 1             # Slurm: the mask is what the rank has
    assert rank_cores([4, 5], 4, 2) == 2
    assert rank_cores(list(range(8)), 2, 2) == 2  # a shared mask left wide: its share, at most per task


@pytest.mark.unit
def test_a_slice_of_the_mask_is_whole_cores(tmp_path):
    """Hyperthreads: CPUs 0-3 are the first threads of cores 0-3, CPUs 4-7 their siblings; two
    ranks of 4 CPUs each get two whole cores, not one the first threads and one the siblings."""
    for cpu in range(8):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(str(cpu % 4))
        (topo / "physical_package_id").write_text("0")
    assert core_order(list(range(8)), str(tmp_path)) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert core_order([3, 1, 2], str(tmp_path / "missing")) == [1, 2, 3]


@pytest.mark.unit
def test_mpiruns_ranks_take_the_per_task_count_job_sh_passes():
    """The ranks mpirun's node daemon forks carry the daemon step's SLURM_CPUS_PER_TASK (all the
    node's cores); job.sh passes the job's own as HVD_BA_CPUS_PER_TASK."""
    assert cores_per_task({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "2", "HVD_BA_CPUS_PER_TASK": "1"}) == 1
    assert cores_per_task({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "2", "HVD_BA_CPUS_PER_TASK": ""}) == 2
    assert cores_per_task({"SLURM_CPUS_PER_TASK": "2"}) is None  # not inside a job


@pytest.mark.parametrize("cores, threads, workers, gpu, split", [
    (1, 0, None, False, (1, 0)),
    (2, 0, None, False, (1, 1)),
    (8, 0, None, False, (6, 2)),
    (8, 0, None, True, (1, 7)),
    (64, 0, None, True, (52, 12)),  # at most 12 loader workers per GPU
    (2, 2, None, False, (2, 0)),   # threads given: workers get what is left
    (4, 0, 3, False, (1, 3)),      # workers given: threads get what is left
    (1, 1, 1, False, (1, 1)),      # both given: kept (and warned about)
])
@pytest.mark.unit
def test_threads_and_workers_derive_from_the_cores(cores, threads, workers, gpu, split):
    assert loader_split(cores, threads, workers, gpu) == split


@pytest.mark.unit
def test_a_rank_short_of_cores_gets_one_warning_line():
    assert oversubscribed(0, "n1", [0, 1], 1, 1, 2) is None
    line = oversubscribed(3, "n2", [0], 1, 1, 2)
    assert line.startswith("hvd_ba: warning: rank 3 on host n2 (cores 0): ")
    assert "its CPU mask holds 1 of the 2 cores Slurm allocated per task" in line
    assert "run.threads 1 + data.workers 1 exceed its 1 cores" in line and "\n" not in line
    assert compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.integration
def test_settings_words_keep_brackets_and_never_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.x=1").write_text("")  # a file a glob of 'data.*' would find
    text = "data.workers=1 augment.scale=[0.25, 1.0] 'run.out_dir=/a b/c' data.*=1 model.x={a: 1, b: [2, 3]}"
    assert settings_words(text) == ["data.workers=1", "augment.scale=[0.25, 1.0]", "run.out_dir=/a b/c", "data.*=1",
                                    "model.x={a: 1, b: [2, 3]}"]
    for bad, says in (("augment.scale=[0.25, 1.0", "never closed"), ("data.workers", "not a section.key=value"),
                      ("'a=1", "No closing quotation")):
        with pytest.raises(ValueError, match=says):
            settings_words(bad)
    r = run_cli("settings", text)
    assert r.returncode == 0 and r.stdout.split("\0")[:-1] == settings_words(text)


@pytest.mark.unit
@pytest.mark.parametrize("env", [SRUN_RANK_3, MPIRUN_RANK_3, HOROVODRUN_RANK_3], ids=["srun", "mpirun", "horovodrun"])
def test_the_second_rank_of_a_node_picks_the_second_gpu(env):
    """Rank 3 is local rank 1 on its node under every launcher (mpirun's ranks carry an inherited
    SLURM_LOCALID of 0, which would put both ranks of a node on GPU 0). select_device takes
    Horovod's local rank, which dist.init checks against this one (local_rank_problem)."""
    from hvd_ba.train.devices import DeviceError, gpu_index

    local = launch_info(env).local_rank
    assert gpu_index(local, 2, "0,1") == 1
    assert gpu_index(local, 2, None) == 1
    assert gpu_index(local, 4, "4,5,6,7") == 1
    assert gpu_index(local, 1, "5") == 0  # Slurm gave each task its own GPU (--gpus-per-task)
    # A third rank on a node with two GPUs: an error naming the count, not a silent share.
    third = launch_info({**env, **{k: "2" for k in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                                     "HOROVOD_LOCAL_RANK") if k in env}}).local_rank
    with pytest.raises(DeviceError, match="local rank 2 but only 2 GPUs visible"):
        gpu_index(third, 2, "0,1")
