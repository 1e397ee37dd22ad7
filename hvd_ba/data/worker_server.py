"""Imported by the fork server of the loader workers alone (pipeline.WORKER_SERVER_PRELOAD), never
by a rank: the server blocks and ignores the preemption signals, and a fork inherits both, so no
loader worker can die of one, from its first instruction on.

srun delivers SIGTERM/SIGUSR1 to every process of a task. Ignoring alone leaves a window: PyTorch's
worker loop installs its own SIGTERM handler (which re-raises a SIGTERM that does not come from
the worker's parent, with the default action: death) before it calls our worker_init, which ignores
the signal again. A blocked signal stays pending through that window; worker_init then ignores it,
which discards the pending one, and unblocks (pipeline._worker_init). The server, blocked and
ignoring, survives the signals too, so a later loader can still start its workers."""
import atexit
import os
import signal
import sys

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def in_fork_server() -> bool:
    """Whether this import runs in multiprocessing's fork server (its preload), not in a process
    that merely imports the module (a tool, a test, a doc build)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


if in_fork_server():
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    for _sig in PREEMPTION_SIGNALS:
        signal.signal(_sig, signal.SIG_IGN)
    # The server leaves when its rank is gone. Its interpreter's teardown (torch and the data
    # modules are imported here) took 3 s of a loaded 2-core machine, and the server holds the
    # rank's output pipe until it ends: horovodrun reports the ranks' statuses only then. Nothing
    # of the server's needs tearing down (its workers are forks that end with their rank).
    atexit.register(os._exit, 0)
