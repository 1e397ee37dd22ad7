"""cluster/setup.sh: a second run only verifies; a failed step names itself and shows its log."""
import os
import subprocess
import sys

from conftest import ROOT

SETUP = ROOT / "cluster" / "setup.sh"


def run_setup(tmp_path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "HVD_BA_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600, env=full_env, cwd=tmp_path)


def test_warm_setup_verifies_the_installed_stack(tmp_path):
    r = run_setup(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "horovod 0.28.1: present" in out and "pillow-simd 12.1.1.post0: present" in out
    for line in ("[X] PyTorch", "[X] Gloo", "[X] MPI"):
        assert line in out
    assert "building horovod" not in out


def test_failed_horovod_build_names_the_step_and_shows_the_log(tmp_path):
    bogus = tmp_path / "horovod-0.28.1.tar.gz"
    bogus.write_text("this is not a tarball")
    r = run_setup(tmp_path, HVD_BA_FORCE_HOROVOD_BUILD="1", HVD_BA_HOROVOD_SDIST=str(bogus))
    assert r.returncode == 1
    assert 'setup: step "build horovod" FAILED; last 40 lines of' in r.stderr
    assert "gzip: stdin: not in gzip format" in r.stderr  # the log's tail, not a summary
    assert not list((tmp_path / "cache" / "wheels").glob("horovod-*"))  # nothing half-built is cached
    # the installed Horovod is untouched
    check = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True)
    assert check.returncode == 0


def test_bad_interpreter_is_named(tmp_path):
    r = run_setup(tmp_path, PYTHON=str(tmp_path / "no-python"))
    assert r.returncode == 1
    assert f"'{tmp_path / 'no-python'}' is not a Python >= 3.10" in r.stderr
