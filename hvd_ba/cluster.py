"""Slurm facts for the launchers: host lists, tasks per node, which rank this process is, its
cores (the CPU mask) and whether a process id is alive.

`python -m hvd_ba hosts` turns a job's SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE into the
`-H host:slots,...` list of horovodrun (or an Open MPI hostfile). The expansion follows
`scontrol show hostnames`: comma-separated items, each with any number of bracket groups of
numbers and ranges (`node[01-04,07]`, `rack[1-2]-gpu[1-2]`, first group outermost), zero
padding kept from the range's first number. Plain Python rather than a `scontrol` call: it must
run where the launcher runs, which can be a node without Slurm's commands, and it is tested
against many forms.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import re
import shlex


class HostListError(ValueError):
    """A host list or tasks-per-node string that does not parse; the message names it."""


def split_outside_brackets(text: str, max_depth: int | None = None) -> list[str]:
    """Split on the commas outside brackets ('[]' and '{}'): '1,[0.25, 1.0],{a: 2}' -> ['1',
    '[0.25, 1.0]', '{a: 2}'], each piece as written (not stripped). Raises ValueError naming the
    position of a closing bracket without an opening one, of one nested deeper than
    `max_depth`, or an opening one never closed. Slurm host lists and `sweep --grid` value lists."""
    items, opened, start = [], [], 0
    for i, ch in enumerate(text):
        if ch in "[{":
            opened.append(ch)
            if max_depth is not None and len(opened) > max_depth:
                raise ValueError(f"nested {ch!r} at position {i}")
        elif ch in "]}":
            if not opened:
                raise ValueError(f"{ch!r} without {'[' if ch == ']' else '{'!r} at position {i}")
            opened.pop()
        elif ch == "," and not opened:
            items.append(text[start:i])
            start = i + 1
    if opened:
        raise ValueError(f"{opened[-1]!r} is never closed")
    items.append(text[start:])
    return items


MAX_HOSTS = 100_000  # more nodes than the largest machines have: a typo, refused before it fills memory


def _expand_group(body: str, whole: str) -> list[str]:
    """'01-04,07' -> ['01', '02', '03', '04', '07']."""
    values = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d{1,18})(?:-(\d{1,18}))?", part.strip())
        if not m:
            raise HostListError(f"host list {whole!r}: {part!r} in [{body}] is not a number or a range lo-hi")
        lo_text, hi_text = m.group(1), m.group(2)
        if hi_text is None:
            values.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise HostListError(f"host list {whole!r}: range {part!r} runs backwards")
        if hi - lo + 1 + len(values) > MAX_HOSTS:
            raise HostListError(f"host list {whole!r}: [{body}] names more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        values += [str(n).zfill(width) for n in range(lo, hi + 1)]
    return values


def _given(text: str | None, what: str, variable: str) -> str:
    """`text` stripped; HostListError naming the Slurm variable when it is empty."""
    text = (text or "").strip()
    if not text:
        raise HostListError(f"{what} is empty (is {variable} set? run inside a Slurm job)")
    return text


def expand_hostlist(text: str) -> list[str]:
    """Every host of a Slurm host list, in Slurm's order (duplicates kept, as Slurm does)."""
    text = _given(text, "host list", "SLURM_JOB_NODELIST")
    hosts = []
    try:
        items = split_outside_brackets(text, max_depth=1)
    except ValueError as err:
        raise HostListError(f"host list {text!r}: {err}") from None
    for item in items:
        if not item:
            raise HostListError(f"host list {text!r}: empty host name (two commas, or a trailing comma)")
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices = []
        for piece in pieces:
            if piece.startswith("["):
                if piece == "[]":
                    raise HostListError(f"host list {text!r}: empty brackets in {item!r}")
                choices.append(_expand_group(piece[1:-1], text))
            elif piece:
                if not re.fullmatch(r"[A-Za-z0-9._-]+", piece):
                    raise HostListError(f"host list {text!r}: {piece!r} in {item!r} is not a host name")
                choices.append([piece])
        if len(hosts) + math.prod(len(c) for c in choices) > MAX_HOSTS:
            raise HostListError(f"host list {text!r} names more than {MAX_HOSTS} hosts")
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE (or SLURM_JOB_CPUS_PER_NODE) form '2(x3),1' -> [2, 2, 2, 1]."""
    text = _given(text, "tasks per node", "SLURM_TASKS_PER_NODE")
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d{1,18})(?:\(x(\d{1,18})\))?", part.strip())
        if not m:
            raise HostListError(f"tasks per node {text!r}: {part!r} is not N or N(xK)")
        n, repeat = int(m.group(1)), int(m.group(2) or 1)
        if n < 1 or repeat < 1:
            raise HostListError(f"tasks per node {text!r}: {part!r} gives no tasks")
        if len(counts) + repeat > MAX_HOSTS:
            raise HostListError(f"tasks per node {text!r}: more than {MAX_HOSTS} nodes")
        counts += [n] * repeat
    return counts


def slots(nodelist: str, tasks_per_node: str) -> list[tuple[str, int]]:
    """[(host, tasks)] of a job; the two strings must describe the same number of nodes."""
    hosts, counts = expand_hostlist(nodelist), expand_tasks_per_node(tasks_per_node)
    if len(counts) == 1 and len(hosts) > 1:
        counts *= len(hosts)  # '4' alone: every node
    if len(hosts) != len(counts):
        raise HostListError(f"host list {nodelist!r} has {len(hosts)} hosts but tasks per node "
                            f"{tasks_per_node!r} gives {len(counts)} counts")
    return list(zip(hosts, counts))


def check_tasks(host_slots: list[tuple[str, int]], np: int) -> None:
    total = sum(n for _, n in host_slots)
    if np < 1:
        raise HostListError(f"-np {np}: need at least one task")
    if np > total:
        listing = ",".join(f"{h}:{n}" for h, n in host_slots)
        raise HostListError(f"{np} tasks requested but the hosts have only {total} slots ({listing}); "
                            "ask Slurm for more tasks (--ntasks / --ntasks-per-node) or lower -np")


def horovod_hosts(host_slots: list[tuple[str, int]]) -> str:
    """horovodrun's -H value."""
    return ",".join(f"{h}:{n}" for h, n in host_slots)


def mpi_hostfile(host_slots: list[tuple[str, int]]) -> str:
    """An Open MPI hostfile."""
    return "".join(f"{h} slots={n}\n" for h, n in host_slots)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started: by which launcher, as which rank of how many, and as which
    of how many ranks on its node (local_rank / local_size are None where the launcher does not say)."""
    launcher: str  # horovodrun | torchrun | mpirun | mpi (another MPI's PMI) | srun | alone
    rank: int
    world: int
    local_rank: int | None
    local_size: int | None

    @property
    def mpi(self) -> bool:
        """Started by an MPI launcher (mpirun, or srun with a PMI plugin): MPI may be initialised."""
        return self.pmi or self.launcher in ("mpirun", "mpi")

    pmi: bool = False


def _int(env, key) -> int | None:
    value = env.get(key)
    return int(value) if value not in (None, "") else None


def _slurm_local_size(env) -> int | None:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ('2(x2)') at SLURM_NODEID."""
    text, node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"), _int(env, "SLURM_NODEID")
    if not text:
        return None
    counts = expand_tasks_per_node(text)
    return counts[node] if node is not None and node < len(counts) else counts[0]


def launch_info(env=None) -> Launch:
    """The one place that reads the launchers' variables. The order matters: ranks that mpirun
    forks inherit its daemon's srun task variables (SLURM_PROCID, SLURM_LOCALID of the node's one
    daemon), and horovodrun's ranks those of the batch step, so the launcher that started the
    process directly is asked first: horovodrun (HOROVOD_*), Open MPI's mpirun (OMPI_COMM_WORLD_*),
    torchrun (TORCHELASTIC_RUN_ID with RANK / WORLD_SIZE), another MPI (PMI_RANK / PMI_SIZE,
    MPI_LOCALRANKID), srun (SLURM_PROCID of a job step)."""
    env = os.environ if env is None else env
    pmi = any(k in env for k in ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"))  # an MPI launch
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        return Launch("horovodrun", int(env["HOROVOD_RANK"]), int(env["HOROVOD_SIZE"]),
                      _int(env, "HOROVOD_LOCAL_RANK"), _int(env, "HOROVOD_LOCAL_SIZE"), pmi)
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), _int(env, "LOCAL_RANK"),
                      _int(env, "LOCAL_WORLD_SIZE"), pmi)
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return Launch("mpirun", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                      _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"), True)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
        return Launch("srun", int(env["SLURM_PROCID"]), world, _int(env, "SLURM_LOCALID"), _slurm_local_size(env), pmi)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return Launch("mpi", int(env["PMI_RANK"]), int(env["PMI_SIZE"]), _int(env, "MPI_LOCALRANKID"),
                      _int(env, "MPI_LOCALNRANKS"), True)
    return Launch("alone", 0, 1, 0, 1, pmi)


class RendezvousError(RuntimeError):
    """No address where the ranks of a torch.distributed run can meet; the message names the
    variables that were read."""


PORT_LOW, PORT_HIGH = 10000, 32768  # derived rendezvous ports


def rendezvous(launch: Launch, env=None) -> tuple[str, int]:
    """(address, port) where the ranks of a torch.distributed run meet (rank 0 listens there).
    MASTER_ADDR / MASTER_PORT when set (torchrun sets both); else, inside a Slurm job, the first
    host of the step's (or job's) host list and a port derived from the job and step ids
    (every rank of a step computes the same; two jobs or steps sharing a node differ); else, where all ranks are on this
    node, 127.0.0.1 and a port derived from the launch's id (Open MPI's PMIX_NAMESPACE)."""
    env = os.environ if env is None else env
    address, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT")
    job = env.get("SLURM_JOB_ID")
    if not address and job:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise RendezvousError(f"rank {launch.rank}: no master address: MASTER_ADDR is unset and so are "
                                  f"SLURM_STEP_NODELIST and SLURM_JOB_NODELIST (Slurm job {job}); set MASTER_ADDR")
        try:
            address = expand_hostlist(nodes)[0]
        except HostListError as err:
            raise RendezvousError(f"rank {launch.rank}: no master address from the Slurm host list: {err}") from None
    if not address:
        if launch.local_size is not None and launch.local_size != launch.world:
            raise RendezvousError(
                f"rank {launch.rank}: no master address for {launch.world} ranks over several nodes: MASTER_ADDR "
                f"is unset and this is no Slurm job (SLURM_JOB_ID unset); set MASTER_ADDR and MASTER_PORT")
        address = "127.0.0.1"
    if port is None:
        seed = (f"{job}.{env.get('SLURM_STEP_ID', '')}" if job else
                env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_orte_hnp_uri", "").split(";")[0])
        if not seed:
            raise RendezvousError(f"rank {launch.rank}: no master port: MASTER_PORT is unset and neither "
                                  "SLURM_JOB_ID nor Open MPI's PMIX_NAMESPACE names the launch; set MASTER_PORT")
        # below Linux's ephemeral ports (32768-60999), where other sockets of the node may sit
        port = PORT_LOW + int(hashlib.sha256(seed.encode()).hexdigest(), 16) % (PORT_HIGH - PORT_LOW)
    return address, port


def launch_rank() -> tuple[int, int]:
    """(rank, world) of this process as its launcher set them, without initialising Horovod."""
    info = launch_info()
    return info.rank, info.world


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------ cores


def cpu_mask(pid: int = 0) -> list[int]:
    """The CPUs a process may run on (0: this one), sorted: its CPU mask, which a Slurm step, a
    launcher's binding or taskset narrows. Where the system has no sched_getaffinity (macOS),
    every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(pid))
    return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """The cores this process may use: its CPU mask's (os.cpu_count() counts the whole node's)."""
    return len(cpu_mask())


def cores_per_task(env=None) -> int | None:
    """The cores Slurm allocated to each task (--cpus-per-task), inside a Slurm job; else None.
    HVD_BA_CPUS_PER_TASK (set by slurm/job.sh for mpirun's ranks) comes first: the ranks that
    mpirun's node daemon forks inherit the SLURM_CPUS_PER_TASK of the daemon's own srun step."""
    env = os.environ if env is None else env
    if env.get("HVD_BA_CPUS_PER_TASK"):
        return int(env["HVD_BA_CPUS_PER_TASK"])
    return _int(env, "SLURM_CPUS_PER_TASK") if "SLURM_JOB_ID" in env else None


def core_order(cpus: list[int], topology: str = "/sys/devices/system/cpu") -> list[int]:
    """CPUs ordered so that the hardware threads of one core are neighbours (package, core id,
    CPU): a slice of them is then whole cores, not the first threads of many cores."""
    def key(cpu):
        base = f"{topology}/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                package = int(f.read())
            with open(f"{base}/core_id") as f:
                core = int(f.read())
        except (OSError, ValueError):
            package, core = 0, cpu
        return package, core, cpu

    return sorted(cpus, key=key)


def rank_share(mask: list[int], local_rank: int, local_size: int, per_task: int | None) -> list[int] | None:
    """The cores a rank should keep when Slurm allocated `per_task` cores to each task
    (--cpus-per-task) and the rank's CPU mask holds exactly those of its node's ranks
    (local_size x per_task: a launcher that does not bind, as horovodrun, or mpirun with
    --bind-to none, inside the job's allocation): its local rank's slice, whole cores first.
    None: keep the mask: it is the rank's share already, smaller than one, or larger than the
    node's allocation (ranks started over ssh outside the job's cgroup: slicing could take
    another job's cores), or no allocation is known (outside Slurm)."""
    if not per_task or local_rank >= local_size or len(mask) != local_size * per_task or len(mask) <= per_task:
        return None
    return sorted(core_order(list(mask))[local_rank * per_task:(local_rank + 1) * per_task])


def rank_cores(mask: list[int], local_size: int, per_task: int | None) -> int:
    """The cores a rank may count on: its mask's when that is its own; where the ranks of a
    node share one mask (outside Slurm, or a mask rank_share left wide) an equal part of it, at
    most the cores Slurm allocated per task."""
    if local_size <= 1 or (per_task and len(mask) <= per_task):
        return len(mask)
    share = max(1, len(mask) // local_size)
    return min(share, per_task) if per_task else share


def bind_rank(setting: str, launch: Launch | None = None) -> tuple[list[int], list[int]]:
    """run.bind: with `auto`, narrow this process's CPU mask to its Slurm share (rank_share); call before
    any thread starts (Horovod's, torch's, the loader workers inherit the mask). Returns the mask
    (before, after)."""
    before = cpu_mask()
    if setting != "auto":
        return before, before
    launch = launch or launch_info()
    share = rank_share(before, launch.local_rank or 0, launch.local_size or 1, cores_per_task())
    if share is not None:
        try:
            os.sched_setaffinity(0, share)
        except OSError:
            pass  # a cpuset that does not allow it: keep what the launcher gave
    return before, cpu_mask()


MAX_GPU_WORKERS = 12  # beyond this, more workers only add memory (each holds batches in /dev/shm)


def loader_split(cores: int, threads: int, workers: int | None, gpu: bool) -> tuple[int, int]:
    """(torch threads, loader workers) of a rank with `cores` cores. threads 0 / workers None:
    derived from the cores: on a GPU the workers decode and augment while the rank's one thread
    feeds the device (workers = cores - 1, at most MAX_GPU_WORKERS); on CPUs the model's threads need most cores (workers =
    a quarter, at least one where there are two cores), threads take the rest."""
    if workers is None:
        workers = 0 if cores < 2 else (min(cores - 1, MAX_GPU_WORKERS) if gpu else max(1, cores // 4))
        if threads:
            workers = min(workers, max(0, cores - threads))
    threads = threads or max(1, cores - workers)
    return threads, workers


def oversubscribed(rank: int, host: str, mask: list[int], threads: int, workers: int,
                   per_task: int | None = None) -> str | None:
    """One warning line for a rank whose threads + loader workers exceed its cores, or that has
    fewer cores than Slurm allocated per task; None when it fits."""
    cores = len(mask)
    problems = []
    if per_task and cores < per_task:
        problems.append(f"its CPU mask holds {cores} of the {per_task} cores Slurm allocated per task "
                        "(SLURM_CPUS_PER_TASK; srun needs --cpus-per-task or SRUN_CPUS_PER_TASK since Slurm 22.05)")
    if threads + workers > cores:
        problems.append(f"run.threads {threads} + data.workers {workers} exceed its {cores} cores, so they contend "
                        "(lower them, or ask for more cores per task)")
    if not problems:
        return None
    return f"hvd_ba: warning: rank {rank} on host {host} (cores {compact(mask)}): " + "; ".join(problems)


def compact(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the form of /proc's Cpus_allowed_list)."""
    parts, cores = [], sorted(cores)
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        parts.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(parts)


def settings_words(text: str) -> list[str]:
    """The `key=value` overrides of a SETTINGS string (slurm/job.sh): words split as a shell would
    split them, quotes honoured, but never globbed, and a value's brackets kept whole, so
    `augment.scale=[0.25, 1.0]` is one override. Raises ValueError naming a word that is no
    override or a bracket that is never closed."""
    try:
        tokens = shlex.split(text or "", comments=False, posix=True)
    except ValueError as err:
        raise ValueError(f"SETTINGS {text!r}: {err}") from None
    words, current = [], None
    for token in tokens:
        current = token if current is None else f"{current} {token}"
        if current.count("[") + current.count("{") > current.count("]") + current.count("}"):
            continue  # a list or mapping value that a space split: join the next word
        words.append(current)
        current = None
    if current is not None:
        raise ValueError(f"SETTINGS: {current!r} opens a '[' or '{{' that is never closed")
    for word in words:
        if "=" not in word or word.startswith("="):
            raise ValueError(f"SETTINGS: {word!r} is not a section.key=value override")
    return words
