"""Patch the installed Horovod 0.28.1 launcher (horovodrun) so that a stopped job's exit status is
not lost. Idempotent: prints "present" when the patch is already in. Run by cluster/setup.sh.

horovodrun runs each rank as `sh -c "cd ...; env ... python ..."` under a middleman process. On
Ctrl-C or SIGTERM the middleman's terminate thread (safe_shell_exec.
terminate_executor_shell_and_children) sends the rank SIGTERM, waits for it, then SIGSTOPs the
shell, SIGTERMs it and waits for it with psutil. Two races followed when the rank stopped cleanly
(the preemption path: checkpoint, exit 75):

- psutil's wait reaps the shell (it is the middleman's child), so the middleman's main thread,
  blocked in Popen.wait(), gets ECHILD, which Popen reports as exit status 0: horovodrun said the
  rank succeeded, and with every rank so, exited 0 for a stopped job (2 of 10 stops measured on a
  2-core VM, 2026-12-03, tests/test_launchers.py reproduces it);
- a SIGSTOP that lands between the rank's exit and the shell's own turned 75 into 137 after 5 s.

The patched function waits for the shell without reaping it (waitid WNOWAIT) and stops or
signals the shell only while its children are still alive, as before.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARKER = "# hvd_ba patch: the shell's exit status is left to the middleman's main thread"

ORIGINAL = """    # Wait for graceful termination.
    gone, alive = psutil.wait_procs(p.children(), timeout=GRACEFUL_TERMINATION_TIME_S)

    # Freeze the process to prevent it from spawning any new children.
"""

PATCHED = f"""    # Wait for graceful termination.
    gone, alive = psutil.wait_procs(p.children(), timeout=GRACEFUL_TERMINATION_TIME_S)

    {MARKER}
    # (Popen.wait() reads 0 when another thread reaped the shell): wait for the shell without
    # reaping it, and freeze or signal it only when children outlived the grace period.
    if not alive and _exited_unreaped(pid, GRACEFUL_TERMINATION_TIME_S):
        return

    # Freeze the process to prevent it from spawning any new children.
"""

ORIGINAL_TAIL = """    # Kill shell itself.
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass

    try:
        p.wait(timeout=GRACEFUL_TERMINATION_TIME_S)
    except psutil.TimeoutExpired:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
"""

PATCHED_TAIL = """    # Kill shell itself.
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass

    if not _exited_unreaped(pid, GRACEFUL_TERMINATION_TIME_S):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _exited_unreaped(pid, timeout):
    # hvd_ba patch: True once `pid` has exited (or is not a child of this process), within
    # `timeout` seconds; the exited child stays a zombie for the thread that waits for it.
    deadline = time.time() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.02)
"""


def target() -> Path:
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("patch_horovod: horovod is not installed in this Python")
    return Path(list(spec.submodule_search_locations)[0]) / "runner" / "common" / "util" / "safe_shell_exec.py"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else target()  # a path: that file (the tests' copies)
    text = path.read_text()
    if MARKER in text:
        print(f"horovodrun exit-status patch: present ({path})")
        return 0
    if text.count(ORIGINAL) != 1 or text.count(ORIGINAL_TAIL) != 1:
        print(f"patch_horovod: {path} is not Horovod 0.28.1's safe_shell_exec.py (the text to patch is not "
              "there); horovodrun may report 0 for a stopped rank", file=sys.stderr)
        return 1
    patched = text.replace(ORIGINAL, PATCHED).replace(ORIGINAL_TAIL, PATCHED_TAIL)
    tmp = path.with_suffix(".py.hvd_ba-tmp")
    tmp.write_text(patched)
    tmp.replace(path)
    print(f"horovodrun exit-status patch: applied ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
