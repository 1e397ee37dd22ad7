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

A second patch (horovod/common/util.py) keeps horovodrun's answers to "was the extension built
with Gloo / with MPI" between launches. Before it starts any rank, horovodrun forks a process
that imports horovod.torch, and so torch, only to ask the library how it was built: 2.8 s of the
4.8 s horovodrun needs to run two empty ranks on a 2-core VM (2026-12-03), and a full torch import
from the shared file system on a cluster. The answers are kept in
`horovod-build-checks.json` under `$HVD_BA_CACHE` (default `~/.cache/hvd_ba`), keyed by the
extension's libraries and the framework's package (path, size, mtime, inode, ctime): a rebuilt
Horovod or a reinstalled torch asks again. Only "built with ..." answers are kept (not whether the
extension imports now, as `--check-build` asks, nor "running with GPU"), never a failed check, and
a verbose check (`horovodrun --verbose --check-build`) always asks. A kept answer does not say that the extension still imports: where it
no longer does (a library missing from LD_LIBRARY_PATH), the ranks fail at their import instead.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

MARKER = "# hvd_ba patch v2"  # a marker's text before " v<N>" names any version of it: replaced by this one
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


BUILD_MARKER = "# hvd_ba build-check cache v3"
BUILD_START = "def _check_extension_lambda(ext_base_name, fn, fn_desc, verbose):\n"
BUILD_END = "\n\n\ndef extension_available("

BUILD_ORIGINAL = '''def _check_extension_lambda(ext_base_name, fn, fn_desc, verbose):
    """
    Tries to load the extension in a new process.  If successful, puts fn(ext)
    to the queue or False otherwise.  Mutes all stdout/stderr.
    """
    def _target_fn(ext_base_name, fn, fn_desc, queue, verbose):
        import importlib
        import sys
        import traceback

        if verbose:
            print('Checking whether extension {ext_base_name} was {fn_desc}.'.format(
                ext_base_name=ext_base_name, fn_desc=fn_desc))
        else:
            # Suppress output
            sys.stdout = open(os.devnull, 'w')
            sys.stderr = open(os.devnull, 'w')

        try:
            ext = importlib.import_module('.' + ext_base_name, 'horovod')
            result = fn(ext)
        except:
            traceback.print_exc()
            result = None

        if verbose:
            print('Extension {ext_base_name} {flag} {fn_desc}.'.format(
                ext_base_name=ext_base_name, flag=('was' if result else 'was NOT'),
                fn_desc=fn_desc))

        queue.put(result)

    # 'fork' is required because horovodrun is a frozen executable
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    p = ctx.Process(target=_target_fn,
                    args=(ext_base_name, fn, fn_desc, queue, verbose))
    p.daemon = True
    p.start()
    p.join()
    return queue.get_nowait()
'''

BUILD_PATCHED = f'''def _check_extension_lambda(ext_base_name, fn, fn_desc, verbose):
    {BUILD_MARKER} (cluster/patch_horovod.py of hvd_ba): how the extension was built
    # (with Gloo, with MPI) is asked once per build of it, not at every horovodrun start: each
    # answer imports the framework in a forked process.
    libraries = _extension_libraries(ext_base_name)
    if not libraries:
        return None  # what the forked import answers: check_extension raises ImportError
    key = None if verbose or not fn_desc.startswith("built with ") else _build_check_key(ext_base_name, libraries, fn_desc)
    if key is not None:
        known = _build_checks().get(key)
        if isinstance(known, bool):
            return known
    result = _check_extension_lambda_uncached(ext_base_name, fn, fn_desc, verbose)
    if key is not None and isinstance(result, bool):
        _keep_build_check(key, result)
    return result


def _extension_libraries(ext_base_name):
    import glob

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ext_base_name)
    return sorted(glob.glob(os.path.join(folder, "**", "*.so"), recursive=True))


def _build_checks_path():
    folder = os.environ.get("HVD_BA_CACHE") or os.path.expanduser("~/.cache/hvd_ba")
    if folder.startswith("~"):  # no home: keep nothing
        return None
    return os.path.join(folder, "horovod-build-checks.json")


def _build_check_key(framework, libraries, fn_desc):
    # The extension's libraries and the framework's package, by path, size, mtime, inode and
    # ctime (an unpacker may keep a file's mtime, never its ctime); None (ask every time) where
    # the framework is not found.
    import importlib.util

    try:
        spec = importlib.util.find_spec(framework)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None
    parts = [fn_desc]
    try:
        for path in [*libraries, spec.origin]:
            st = os.stat(path)
            parts.append("%s:%d:%d:%d:%d" % (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    except OSError:
        return None
    return "|".join(parts)


def _build_checks():
    path = _build_checks_path()
    try:
        with open(path) as f:
            known = json.load(f)
        return known if isinstance(known, dict) else {{}}
    except (OSError, TypeError, ValueError):
        return {{}}


def _keep_build_check(key, result):
    # Atomic (a private temporary file renamed over the cache); a cache that cannot be written is
    # no error: the next start asks again.
    import tempfile

    path = _build_checks_path()
    if path is None:
        return
    known = _build_checks()
    known[key] = result
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".horovod-build-checks.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


''' + BUILD_ORIGINAL.replace("def _check_extension_lambda(", "def _check_extension_lambda_uncached(", 1)


class Patch(NamedTuple):
    what: str  # as the set-up prints it
    file: str  # in the horovod package
    marker: str
    start: str
    end: str
    original: str
    patched: str
    without: str  # what goes wrong without it


EXIT_STATUS = Patch("horovodrun exit-status patch", "runner/common/util/safe_shell_exec.py", MARKER, START, END,
                    ORIGINAL, PATCHED, "horovodrun may report 0 or 137 for a stopped rank")
BUILD_CHECK = Patch("horovodrun build-check cache", "common/util.py", BUILD_MARKER, BUILD_START, BUILD_END,
                    BUILD_ORIGINAL, BUILD_PATCHED, "every horovodrun start imports torch to ask how Horovod was built")
PATCHES = (EXIT_STATUS, BUILD_CHECK)


def target(patch: Patch = EXIT_STATUS) -> Path:
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("patch_horovod: horovod is not installed in this Python")
    return Path(list(spec.submodule_search_locations)[0]) / patch.file


def patched_text(text: str, patch: Patch = EXIT_STATUS) -> str | None:
    """The file's text with the function replaced, or None where the file is not Horovod 0.28.1's
    (patched or not)."""
    start = text.find(patch.start)
    end = text.find(patch.end, start)
    if text.count(patch.start) != 1 or end < 0:
        return None
    region = text[start:end + 1]  # the function and, once patched, its helpers; ends in one newline
    if region != patch.original and patch.marker.rsplit(" v", 1)[0] not in region:
        return None
    return text[:start] + patch.patched + text[end + 1:]


def apply(path: Path, patch: Patch) -> int:
    text = path.read_text()
    if patch.marker in text:
        print(f"{patch.what}: present ({path})")
        return 0
    patched = patched_text(text, patch)
    if patched is None:
        print(f"patch_horovod: {path} is not Horovod 0.28.1's {Path(patch.file).name} (the function to patch is not "
              f"as expected); {patch.what} not applied: {patch.without}", file=sys.stderr)
        return 1
    tmp = path.with_name(path.name + ".hvd_ba-tmp")
    try:
        tmp.write_text(patched)
        shutil.copymode(path, tmp)  # as readable as the file it replaces (a umask of 077 must not hide it)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        print(f"patch_horovod: warning: cannot patch {path} ({err.strerror or err}); {patch.what} not applied "
              f"({patch.without}): run cluster/setup.sh as the owner of this Python environment", file=sys.stderr)
        return 0
    print(f"{patch.what}: applied ({path})")
    return 0


def main(argv: list[str]) -> int:
    """Both patches to the installed Horovod; with a path (the tests' copies), the patch whose
    function that file holds."""
    if not argv:
        return max(apply(target(patch), patch) for patch in PATCHES)
    path = Path(argv[0])
    text = path.read_text()
    patch = next((p for p in PATCHES if p.start in text), EXIT_STATUS)
    return apply(path, patch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
