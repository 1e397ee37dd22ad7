"""cluster/setup.sh: a second run only verifies; a failed step names itself and shows its log."""
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.integration

SETUP = ROOT / "cluster" / "setup.sh"


def run_setup(tmp_path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "HVD_BA_CACHE": str(tmp_path / "cache"), "HVD_BA_GPU": "0",
                **env}
    return subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600, env=full_env, cwd=tmp_path)


def test_warm_setup_verifies_the_installed_stack(tmp_path):
    r = run_setup(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "horovod 0.28.1: present" in out and "pillow-simd 12.1.1.post0: present" in out
    assert "horovodrun exit-status patch: present" in out and "horovodrun build-check cache: present" in out
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


# ------------------------------------------------------------- GPU build detection (fake trees)

def fake_cuda(root, version, nvcc=True):
    """A CUDA toolkit folder: bin/nvcc printing its release (or only version.json)."""
    root.mkdir(parents=True, exist_ok=True)
    if nvcc:
        (root / "bin").mkdir(exist_ok=True)
        (root / "bin" / "nvcc").write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
        (root / "bin" / "nvcc").chmod(0o755)
    else:
        (root / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "%s.1"}}' % version)
    return root


def fake_nccl(root, lib="lib", name="libnccl.so.2"):
    (root / "include").mkdir(parents=True, exist_ok=True)
    (root / "include" / "nccl.h").write_text("/* nccl */\n")
    (root / lib).mkdir(exist_ok=True)
    (root / lib / name).write_bytes(b"\x7fELF")
    return root


def detect(tmp_path, torch_cuda="13.0", torch_nccl="", has_gpu="1", **env):
    script = (f"source {ROOT / 'cluster' / 'gpu_detect.sh'}; gpu_detect \"$@\"; rc=$?; "
              "printf '%s\\n' \"rc=$rc\" \"ops=$GPU_OPS\" \"cuda=$GPU_CUDA_HOME\" \"nccl=$GPU_NCCL_HOME\" "
              "\"link=$GPU_NCCL_LINK\" \"include=$GPU_NCCL_INCLUDE\" \"lib=$GPU_NCCL_LIB\" \"why=$GPU_WHY\"")
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "NCCL_HOME", "HOROVOD_NCCL_HOME",
                                                             "HVD_BA_GPU")}
    tools = tmp_path / "tools"  # the few commands the function uses, and no nvcc of this machine's
    if not tools.exists():
        tools.mkdir()
        for name in ("sed", "ls", "dirname", "head", "mkdir", "ln", "readlink", "tr"):
            (tools / name).symlink_to(shutil.which(name))
    base["PATH"] = str(tools)
    if "PATH" in env:
        env["PATH"] = env["PATH"].replace("/usr/bin:/bin", str(tools))
    r = subprocess.run([shutil.which("bash"), "-c", script, "detect", torch_cuda, torch_nccl, has_gpu, str(tmp_path / "private")],
                       capture_output=True, text=True, env={**base, "HVD_BA_SYSROOT": str(tmp_path / "sys"), **env})
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


def test_gpu_detect_cpu_cases(tmp_path):
    fake_cuda(tmp_path / "sys/usr/local/cuda", "13.0")
    assert detect(tmp_path, HVD_BA_GPU="0")["ops"] == ""
    got = detect(tmp_path, has_gpu="0")
    assert got["ops"] == "" and got["rc"] == "0" and "no GPU on this node" in got["why"]
    got = detect(tmp_path, torch_cuda="", HVD_BA_GPU="1")
    assert got["rc"] == "1" and "torch is a CPU build" in got["why"]


def test_gpu_detect_torch_wheel_nccl_with_nvcc_on_path(tmp_path):
    cuda = fake_cuda(tmp_path / "modules/cuda-13.0", "13.0")
    wheel = fake_nccl(tmp_path / "site-packages/nvidia/nccl")  # lib/libnccl.so.2 only, as the wheel
    got = detect(tmp_path, torch_nccl=str(wheel), PATH=f"{cuda}/bin:/usr/bin:/bin")
    assert got["rc"] == "0" and got["ops"] == "NCCL" and got["cuda"] == str(cuda) and got["link"] == "SHARED"
    private = tmp_path / "private"
    assert got["nccl"] == str(private)
    assert os.path.realpath(private / "lib" / "libnccl.so") == str(wheel / "lib" / "libnccl.so.2")
    assert os.path.realpath(private / "include" / "nccl.h") == str(wheel / "include" / "nccl.h")


def test_gpu_detect_cuda_home_and_nccl_home_take_precedence(tmp_path):
    fake_cuda(tmp_path / "sys/usr/local/cuda", "13.0")
    home = fake_cuda(tmp_path / "opt/cuda", "13.1", nvcc=False)  # version.json only
    nccl = fake_nccl(tmp_path / "opt/nccl", lib="lib64", name="libnccl.so")
    got = detect(tmp_path, CUDA_HOME=str(home), NCCL_HOME=str(nccl), torch_nccl=str(tmp_path / "absent"))
    assert (got["ops"], got["cuda"], got["nccl"]) == ("NCCL", str(home), str(nccl))


def test_gpu_detect_refuses_a_cuda_of_another_major(tmp_path):
    fake_cuda(tmp_path / "sys/usr/local/cuda", "12.4")
    fake_nccl(tmp_path / "sys/usr/local/cuda", lib="lib64")
    got = detect(tmp_path, HVD_BA_GPU="1")
    assert got["rc"] == "1" and got["ops"] == ""
    assert "no CUDA 13.x toolkit found" in got["why"] and "(CUDA 12.4, torch needs 13.x)" in got["why"]
    assert detect(tmp_path)["rc"] == "1"  # auto on a node with a GPU: stops with the reason too
    assert detect(tmp_path, has_gpu="0")["rc"] == "0"  # auto without a GPU: the CPU build


def test_gpu_detect_debian_nccl_and_login_node(tmp_path):
    fake_cuda(tmp_path / "sys/usr/local/cuda", "13.0")
    (tmp_path / "sys/usr/include").mkdir(parents=True)
    (tmp_path / "sys/usr/include/nccl.h").write_text("")
    (tmp_path / "sys/usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "sys/usr/lib/x86_64-linux-gnu/libnccl.so.2").write_bytes(b"")
    got = detect(tmp_path, has_gpu="0", HVD_BA_GPU="1")  # a login node, GPU flavour asked for
    assert got["ops"] == "NCCL" and got["include"] == str(tmp_path / "sys/usr/include")
    assert got["lib"] == str(tmp_path / "sys/usr/lib/x86_64-linux-gnu")


def test_gpu_detect_names_where_it_looked_for_nccl(tmp_path):
    fake_cuda(tmp_path / "sys/usr/local/cuda", "13.0")
    got = detect(tmp_path, HVD_BA_GPU="1", NCCL_HOME=str(tmp_path / "nowhere"))
    assert got["rc"] == "1" and got["ops"] == ""
    assert "no NCCL found" in got["why"] and str(tmp_path / "nowhere") in got["why"]
    assert str(tmp_path / "sys/usr/include") in got["why"]


def test_gpu_detect_real_layouts(tmp_path):
    """A multi-line version.json under CUDA_PATH, a symlinked nvcc, an NCCL home with only
    libnccl.so.2 (linked privately: Horovod's build links -lnccl), a bad HVD_BA_GPU value."""
    home = tmp_path / "opt/cuda-13.0"
    home.mkdir(parents=True)
    (home / "version.json").write_text('{\n   "cuda" : {\n      "name" : "CUDA SDK",\n      "version" : "13.0.88"\n   }\n}\n')
    nccl = fake_nccl(tmp_path / "opt/nccl")  # lib/libnccl.so.2 only
    got = detect(tmp_path, CUDA_PATH=str(home), HOROVOD_NCCL_HOME=str(nccl))
    assert (got["ops"], got["cuda"], got["nccl"]) == ("NCCL", str(home), str(tmp_path / "private"))
    assert os.path.realpath(tmp_path / "private/lib/libnccl.so") == str(nccl / "lib/libnccl.so.2")
    real = fake_cuda(tmp_path / "apps/cuda/13.0.1", "13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/nvcc").symlink_to(real / "bin/nvcc")  # a module's shim folder
    fake_nccl(real, lib="lib64", name="libnccl.so")
    got = detect(tmp_path, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert (got["ops"], got["cuda"], got["nccl"]) == ("NCCL", str(real), str(real))
    got = detect(tmp_path, HVD_BA_GPU="yes")
    assert got["rc"] == "1" and "choose auto, 1 or 0" in got["why"]


def test_torch_backend_setup_needs_no_compiler_no_mpi_and_no_horovod(tmp_path):
    """HVD_BA_BACKEND=torch: on a PATH without compilers, cmake, make or MPI, and with Horovod
    failing to import, the set-up passes and says what it left out."""
    bare = tmp_path / "bin"
    bare.mkdir()
    toolchain = ("cc", "gcc", "g++", "c++", "cpp", "cmake", "make", "ld", "mpicc", "mpicxx", "mpirun", "mpiexec",
                 "orterun", "prterun", "clang")
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            base = name.split("-")[-1] if name.startswith("x86_64-linux-gnu-") else name
            if base.startswith(toolchain) or (bare / name).exists():
                continue
            (bare / name).symlink_to(os.path.join(folder, name))
    fake = tmp_path / "hide" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    assert shutil.which("cc", path=str(bare)) is None and shutil.which("mpirun", path=str(bare)) is None
    r = run_setup(tmp_path, HVD_BA_BACKEND="torch", PATH=str(bare), PYTHONPATH=str(fake.parent),
                  HVD_BA_SKIP_APT="1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    for line in ("system packages: none needed (HVD_BA_BACKEND=torch: wheels only)",
                 "horovod: not installed (HVD_BA_BACKEND=torch)", "pillow-simd: not built (HVD_BA_BACKEND=torch)",
                 "torch.distributed: gloo"):
        assert line in out, (line, out)
    assert "mpi4py" not in out and "building horovod" not in out and "horovodrun" not in out
    bad = run_setup(tmp_path, HVD_BA_BACKEND="nccl")
    assert bad.returncode == 1 and "HVD_BA_BACKEND=nccl: must be horovod or torch" in bad.stderr
