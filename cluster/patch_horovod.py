"""Patch the installed Horovod 0.28.1 launcher (horovodrun) so that a stopped rank's own exit
status reaches horovodrun. Idempotent: prints "present" when this version of the patch is in; an
earlier version of it is replaced. Run by cluster/setup.sh.

horovodrun runs each local rank as `sh -c "cd ...; env ... python ..."` under a middleman
process. On Ctrl-C or SIGTERM the middleman's terminate thread (safe_shell_exec.
terminate_executor_shell_and_children) sends the shell's children SIGTERM, waits for them, then
SIGSTOPs the shell, SIGTERMs it and waits for it with psutil. With a rank that stops cleanly (the
preemption path: checkpoint, exit 75):

- psutil's wait reaped the shell (the middleman's child), so that the middleman's main thread,
  blocked in Popen.wait(), got ECHILD, which Popen reports as exit status 0: horovodrun said the
  rank succeeded and, with every rank so, exited 0 for a stopped job (2 of 10 stops on a 2-core
  VM, 2026-12-03; tests/test_horovod.py reproduces it);
- a SIGSTOP in the moment between the rank's exit and the shell's turned 75 into 137;
- where /bin/sh is bash (RHEL and its kin), the shell execs the command, so the "shell" is the
  rank itself: it never got SIGTERM (only its children did), and was frozen and killed: no
  checkpoint, exit 137.

The patched function sends SIGTERM to the command (the shell's children, or the process itself
where the shell exec'd it), waits for it without reaping the shell (waitid WNOWAIT), and freezes
and kills only what outlives the grace period, as before.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

MARKER = "# hvd_ba patch v2"
ANY_MARKER = "# hvd_ba patch"  # any version of it: replaced by this one
START = "def terminate_executor_shell_and_children(pid):\n"
END = "\n\n\ndef prefix_connection("

ORIGINAL = '''def terminate_executor_shell_and_children(pid):
    # If the shell already ends, no need to terminate its child.
    try:
        p = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return

    # Terminate children gracefully.
    for child in p.children():
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass

    # Wait for graceful termination.
    gone, alive = psutil.wait_procs(p.children(), timeout=GRACEFUL_TERMINATION_TIME_S)

    # Freeze the process to prevent it from spawning any new children.
    try:
        p.send_signal(signal.SIGSTOP)
    except psutil.NoSuchProcess:
        pass

    # Kill children recursively.
    for child in alive:
        try:
            for grandchild in child.children(recursive=True):
                try:
                    grandchild.kill()
                except psutil.NoSuchProcess:
                    pass
            child.kill()
        except psutil.NoSuchProcess:
            pass

    # Kill shell itself.
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
'''

PATCHED = f'''def terminate_executor_shell_and_children(pid):
    {MARKER} (cluster/patch_horovod.py of hvd_ba): the command gets SIGTERM whether or not
    # the shell exec'd it, and the shell is never reaped here: the middleman's main thread reads its
    # status (Popen.wait() reads 0 when another thread reaped it).
    try:
        p = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        is_shell = p.name() in _SHELLS
    except psutil.Error:
        is_shell = True
    children = p.children()
    # The command: the shell's children, or the process itself where the shell exec'd it (bash
    # does so for the last command of `sh -c`).
    targets = children if is_shell else [p]
    for proc in targets:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    if targets:
        if is_shell:
            gone, alive = psutil.wait_procs(children, timeout=GRACEFUL_TERMINATION_TIME_S)
            if not alive and _exited_unreaped(pid, GRACEFUL_TERMINATION_TIME_S):
                return
        elif _exited_unreaped(pid, GRACEFUL_TERMINATION_TIME_S):
            return

    # Still running after the grace period (or a shell that had not started its command yet):
    # freeze it so that it starts nothing more, kill everything below it, then it.
    try:
        p.send_signal(signal.SIGSTOP)
    except psutil.NoSuchProcess:
        pass
    try:
        left = p.children(recursive=True)
    except psutil.NoSuchProcess:
        left = []
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass


_SHELLS = ("sh", "dash", "bash", "ash", "ksh", "mksh", "zsh", "busybox")


def _exited_unreaped(pid, timeout):
    # True once `pid` has exited (or is no child of this process) within `timeout` seconds; the
    # exited child stays a zombie for the thread that waits for it.
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
'''


def target() -> Path:
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("patch_horovod: horovod is not installed in this Python")
    return Path(list(spec.submodule_search_locations)[0]) / "runner" / "common" / "util" / "safe_shell_exec.py"


def patched_text(text: str) -> str | None:
    """The file's text with the function replaced, or None where the file is not Horovod 0.28.1's
    safe_shell_exec.py (patched or not)."""
    start = text.find(START)
    end = text.find(END, start)
    if text.count(START) != 1 or end < 0:
        return None
    region = text[start:end + 1]  # the function and, once patched, its helpers; ends in one newline
    if region != ORIGINAL and ANY_MARKER not in region:
        return None
    return text[:start] + PATCHED + text[end + 1:]


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else target()  # a path: that file (the tests' copies)
    text = path.read_text()
    if MARKER in text:
        print(f"horovodrun exit-status patch: present ({path})")
        return 0
    patched = patched_text(text)
    if patched is None:
        print(f"patch_horovod: {path} is not Horovod 0.28.1's safe_shell_exec.py (the function to patch is not "
              "as expected); horovodrun may report 0 or 137 for a stopped rank", file=sys.stderr)
        return 1
    tmp = path.with_name(path.name + ".hvd_ba-tmp")
    try:
        tmp.write_text(patched)
        shutil.copymode(path, tmp)  # as readable as the file it replaces (a umask of 077 must not hide it)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        print(f"patch_horovod: warning: cannot patch {path} ({err.strerror or err}); horovodrun may report 0 or 137 "
              "for a stopped rank: run cluster/setup.sh as the owner of this Python environment", file=sys.stderr)
        return 0
    print(f"horovodrun exit-status patch: applied ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
