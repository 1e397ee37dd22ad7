"""How a rank stops: preemption signals from the first moment of the process, and a watchdog
that ends a rank which makes no progress.

Signals. SIGTERM and SIGUSR1 (Slurm's --signal, a scheduler's preemption) are caught from the
start of `python -m hvd_ba train`. During start-up (listing the data, the broadcasts, the
resume) nothing has been trained since the last checkpoint, so the handler raises `Preempted`
and the rank exits 75 at once: the last checkpoint stays the resume point. Once training runs,
the handler only sets a flag; the ranks agree on it at the next sync and checkpoint together.

Stalls. A rank that stops making progress without dying (a loader worker blocked on a stalled
file system, a peer rank stopped or deadlocked, so a collective never returns) would hold the
allocation until its time limit. The watchdog thread of each rank ends the job when no progress
was reported for `run.stall_timeout` seconds (a checkpoint write, and the wait for it:
`run.checkpoint_timeout`): it prints one line naming the rank, its host, the limit's key and
what it waited for (the files of the batch), kills the rank's loader workers and exits.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, the last checkpoint is the resume point
STALLED_EXIT_CODE = 70  # EX_SOFTWARE: no progress for run.stall_timeout (or run.checkpoint_timeout) seconds
DISK_FULL_EXIT_CODE = 74  # EX_IOERR: the run folder is full (or read-only); free space, then resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


# Set by the watchdog as it ends the rank: an error the main thread meets from then on (its loader
# workers killed under it) is a consequence, not news (see run.main_rank).
STALL_ENDING = threading.Event()


class Preempted(Exception):
    """A stop signal arrived during start-up: nothing to checkpoint, leave with exit 75."""


class StopRequest:
    """The handler of SIGTERM / SIGUSR1 in a rank's main process.

    `in_startup` True: raise Preempted where the main thread is (start-up); False: set
    `requested` for the ranks' next agreement (training)."""

    def __init__(self):
        self.requested, self.signal_name, self.in_startup = False, None, True

    def __call__(self, signum, frame):
        self.requested, self.signal_name = True, signal.Signals(signum).name
        if self.in_startup:
            self.in_startup = False  # raise once; a second signal during the unwinding only sets the flag
            raise Preempted(f"{self.signal_name} during start-up")

    def training_started(self) -> None:
        """From here a signal only sets the flag (one that came earlier already raised)."""
        self.in_startup = False


_stop: StopRequest | None = None


def install_stop_handlers() -> StopRequest:
    """Called first thing in a rank (before torch or Horovod are imported)."""
    global _stop
    if _stop is None:
        _stop = StopRequest()
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)
    return _stop


def ignore_stop_signals() -> None:
    """The rank's outcome is decided and saved (its checkpoint or result written): a stop signal
    has nothing left to ask. srun --kill-on-bad-exit and mpirun send SIGTERM to the other tasks as
    soon as one rank has exited 75; with a Python handler, which CPython's shutdown resets to the
    default, such a late SIGTERM turned a leaving rank's 75 into 143. SIG_IGN survives the
    shutdown (measured: tests/test_runs.py, ...keeps_its_75)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def leave_now(status: int) -> None:
    """End a rank whose outcome is saved (a stop: its checkpoint written, the lock given up, the
    backend shut down) at once: the exit hooks run (the loader workers killed, logging flushed),
    the interpreter's teardown does not. That teardown (module cleanup and garbage collection of a
    heap full of torch objects) took 3 to 5 s on a loaded 2-core machine, most of the 5 s that
    horovodrun grants its ranks after Ctrl-C before it kills them (exit 137)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _release_loader_resources() -> None:
    try:
        from hvd_ba.data.pipeline import release_loader_resources

        release_loader_resources()
    except Exception:
        pass


def pause_point(phase: str) -> None:
    """Test hook: with HVD_BA_PAUSE_AT=<phase> (and HVD_BA_PAUSE_RANK, default any;
    HVD_BA_PAUSE_RESTART, a Slurm job's attempt, default every), print a line
    and wait there up to 60 s (HVD_BA_PAUSE_SECONDS), so a test can signal a rank at a known
    moment of its start-up, or make a phase slow (the checkpoint write). With HVD_BA_PAUSE_FAULT=1
    the rank dies there of a segmentation fault instead, as a crash in native code would."""
    if os.environ.get("HVD_BA_PAUSE_AT") != phase:
        return
    attempt = os.environ.get("HVD_BA_PAUSE_RESTART")  # only in this attempt of a Slurm job
    if attempt is not None and attempt != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return
    wanted = os.environ.get("HVD_BA_PAUSE_RANK")
    from hvd_ba import dist
    from hvd_ba.cluster import launch_rank

    rank = dist.rank() if dist._hvd or dist._torch_world else launch_rank()[0]  # a tool's rank: its launcher's
    if wanted is not None and int(wanted) != rank:
        return
    if os.environ.get("HVD_BA_PAUSE_FAULT") == "1":  # a native library's crash: a read of address 0
        print(f"hvd_ba: rank {rank} faults at {phase}", flush=True)
        import ctypes

        ctypes.string_at(0)
    print(f"hvd_ba: rank {rank} paused at {phase}", flush=True)
    deadline = time.time() + float(os.environ.get("HVD_BA_PAUSE_SECONDS", "60"))
    while time.time() < deadline:
        time.sleep(0.05)


class Watchdog:
    """Ends the process when `tick` was not called for `timeout` seconds while armed."""

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.last, self.what, self.armed, self.limit = time.monotonic(), "start", False, timeout
        self.key, self.allowed = "run.stall_timeout", timeout
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()

    def tick(self, what, peers: bool = False, timeout: float | None = None, key: str = "run.stall_timeout") -> None:
        """Progress: the rank now waits for `what` (a string, or a callable giving one, called
        only when the watchdog fires). `peers`: a wait that ends only when the other ranks reach
        the same collective; it is given a quarter more time, so that the rank that is really
        stuck (its loader, say) reports first and names the cause. `timeout`, `key`: a wait with
        a limit of its own (the checkpoint write: run.checkpoint_timeout), until the next tick."""
        allowed = self.timeout if timeout is None else timeout
        with self._lock:
            self.last, self.what, self.armed = time.monotonic(), what, True
            self.limit = allowed * (1.25 if peers else 1.0)
            self.key, self.allowed = key, allowed

    def pause(self) -> None:
        """A phase that may legitimately take long (lambda tracking) or the end of training."""
        with self._lock:
            self.armed = False

    def _run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while True:
            time.sleep(period)
            with self._lock:
                idle = time.monotonic() - self.last
                fire = self.armed and idle > self.limit
                what, key, allowed = self.what, self.key, self.allowed
            if fire:
                self._fire(idle, what, key, allowed)

    def _fire(self, idle: float, what, key: str, allowed: float) -> None:
        STALL_ENDING.set()  # the main thread, woken by the workers' deaths below, leaves the exit to this thread
        try:
            what = what() if callable(what) else what
        except Exception as err:  # the message must come out whatever happens
            what = f"(unknown: {err})"
        print(f"hvd_ba: rank {self.rank} on host {socket.gethostname()} stalled: no progress for {idle:.0f} s "
              f"({key} {allowed:g} s) while waiting for {what}; ending the job", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # loader workers, stopped ones included
            try:
                child.kill()
            except Exception:
                pass
        # multiprocessing's own exit phase (semaphores unlinked), so that the resource tracker does
        # not warn of leaked semaphores after the line above; in a thread of its own, given 2 s:
        # whatever stalled the rank must not hold its exit too
        release = threading.Thread(target=_release_loader_resources, daemon=True)
        release.start()
        release.join(2.0)
        sys.stdout.flush()
        try:
            from hvd_ba.train.run_dir import release_held_lock

            release_held_lock()
        except Exception:
            pass
        os._exit(STALLED_EXIT_CODE)
