#!/usr/bin/env bash
# Set up hvd_ba in the active Python (system, venv or conda env): OpenMPI and build tools,
# torch + torchvision, mpi4py, Horovod 0.28.1 patched and built against that torch (the wheel is
# cached), the project itself, and pillow-simd last. Idempotent: a second run installs nothing
# that is present (each part is checked first and skipped) and only verifies the result.
#
#   bash cluster/setup.sh            # PYTHON=/path/to/python to choose the interpreter
#
# Environment: PYTHON (default: python), HVD_BA_CACHE (default: ~/.cache/hvd_ba, where the built
# wheels are kept), HVD_BA_SKIP_APT=1 (never call apt-get), HVD_BA_FORCE_HOROVOD_BUILD=1 (build
# even when installed or cached), HVD_BA_HOROVOD_SDIST=path/to/horovod-0.28.1.tar.gz (no download),
# HVD_BA_GPU=auto|1|0 (Horovod's GPU flavour: where a GPU is | always, failing if CUDA or NCCL is
# missing | never); CUDA_HOME, CUDA_PATH, NCCL_HOME, HOROVOD_NCCL_HOME (where to find them).
#
#   HVD_BA_BACKEND=torch bash cluster/setup.sh   # for run.backend=torch (torch.distributed):
#
# everything but Horovod, from wheels only: no system packages, no compiler, no MPI, no build
# (no mpi4py, whose only user is `stage` under an MPI launcher; Pillow from its wheel, not
# pillow-simd, which compiles).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
CACHE=${HVD_BA_CACHE:-$HOME/.cache/hvd_ba}
LOGS=$CACHE/logs
mkdir -p "$CACHE/wheels" "$LOGS"

# The pins live in requirements.txt (environment.yml mirrors them); read them from there.
pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$ROOT/requirements.txt"; }
TORCH=$(pin torch); TORCHVISION=$(pin torchvision); HOROVOD=$(pin horovod)
MPI4PY=$(pin mpi4py); PILLOW_SIMD=$(pin pillow-simd)

t0=$SECONDS
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
BACKEND=${HVD_BA_BACKEND:-horovod}
case "$BACKEND" in horovod|torch) ;; *) die "HVD_BA_BACKEND=$BACKEND: must be horovod or torch" ;; esac

# step NAME CMD...: run CMD with its output in a log; on failure show the log's tail and stop.
step() {
  local name=$1; shift
  local log="$LOGS/${name// /_}.log"
  local s=$SECONDS rc
  # Not `if "$@"`: bash ignores errexit inside a condition, so a failing command in the middle of
  # a step function would go unnoticed. A subshell with errexit, outside any condition, stops at it.
  set +e
  ( set -e; "$@" ) >"$log" 2>&1
  rc=$?
  set -e
  if [ $rc = 0 ]; then
    say "$name: ok ($((SECONDS - s)) s)"
  else
    printf 'setup: step "%s" FAILED; last 40 lines of %s:\n' "$name" "$log" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || die "'$PY' is not a Python >= 3.10 (set PYTHON=...)"
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
say "python: $("$PY" -c 'import sys; print(sys.executable)') ($PYTAG)"

# ---------------------------------------------------------------- 1. system packages
# What each Debian package gives us, checked by a file or command rather than by dpkg so that a
# conda env (which brings its own compilers / MPI) passes without apt.
if [ "$BACKEND" = horovod ]; then
need_missing() {
  local missing=()
  command -v mpirun >/dev/null || missing+=(openmpi-bin)
  command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  command -v make >/dev/null || missing+=(make)
  command -v ssh >/dev/null || missing+=(openssh-client)
  # headers that pillow-simd compiles against
  echo '#include <jpeglib.h>' | cc -E -x c - >/dev/null 2>&1 || missing+=(libjpeg62-turbo-dev)
  echo '#include <zlib.h>' | cc -E -x c - >/dev/null 2>&1 || missing+=(zlib1g-dev)
  echo "${missing[@]:-}"
}
missing=$(need_missing)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${HVD_BA_SKIP_APT:-0}" != 1 ]; then
    step "apt-get install" bash -c "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q --no-install-recommends $missing"
  else
    die "missing system packages: $missing. Install them (Debian: apt-get install $missing; conda: conda install -c conda-forge openmpi cmake cxx-compiler libjpeg-turbo zlib) and run again."
  fi
fi
missing=$(need_missing)
[ -z "$missing" ] || die "still missing after install: $missing"
say "system packages: ok"
else
  say "system packages: none needed (HVD_BA_BACKEND=torch: wheels only)"
fi

# ---------------------------------------------------------------- 2. python packages
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if have torch "$TORCH" && have torchvision "$TORCHVISION"; then
  say "torch $TORCH, torchvision $TORCHVISION: present"
else
  step "pip install torch" "$PY" -m pip install "torch==$TORCH" "torchvision==$TORCHVISION"
fi
# Everything else in requirements.txt except what is built below.
skip='torch==|torchvision==|horovod==|pillow-simd=='
[ "$BACKEND" = horovod ] || skip="$skip|mpi4py=="
grep -vE "^(#|\$|$skip)" "$ROOT/requirements.txt" >"$CACHE/req-plain.txt"
ok=1
while read -r line; do have "${line%%==*}" "${line##*==}" || ok=0; done <"$CACHE/req-plain.txt"
if [ $ok = 1 ]; then
  say "$(cut -d= -f1 "$CACHE/req-plain.txt" | paste -sd' '): present"
else
  step "pip install requirements" "$PY" -m pip install -r "$CACHE/req-plain.txt"
fi
# Horovod's own runtime and build dependencies (its build runs without isolation).
if "$PY" -c 'import wheel, setuptools, packaging, psutil, cloudpickle' 2>/dev/null; then
  say "wheel setuptools packaging psutil cloudpickle: present"
else
  step "pip install build deps" "$PY" -m pip install wheel setuptools packaging psutil cloudpickle
fi

# ---------------------------------------------------------------- 3. horovod
# The GPU flavour (NCCL) where this node has a GPU (or HVD_BA_GPU=1, e.g. on a login node; 0: CPU
# only), with CUDA and NCCL found by cluster/gpu_detect.sh: nvcc on PATH, CUDA_HOME/CUDA_PATH or
# /usr/local/cuda (its major must be torch's), NCCL from HOROVOD_NCCL_HOME, NCCL_HOME, torch's own
# nvidia-nccl wheel or the system. The CPU build still needs CUDA paths where /usr/local/cuda is
# present, because the torch wheel is a CUDA build.
if [ "$BACKEND" = horovod ]; then
# shellcheck source=cluster/gpu_detect.sh
source "$ROOT/cluster/gpu_detect.sh"
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
TORCH_NCCL=$("$PY" -c 'import importlib.util, os
spec = importlib.util.find_spec("nvidia.nccl") if importlib.util.find_spec("nvidia") else None
print(os.path.dirname(spec.origin) if spec and spec.origin else (list(spec.submodule_search_locations)[0] if spec else ""))' 2>/dev/null || true)
HAS_GPU=0
if command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi -L 2>/dev/null || true)   # not a pipe into grep -q: pipefail and SIGPIPE
  case "$gpus" in *GPU*) HAS_GPU=1 ;; esac
fi
# Detection first: a toolkit that `module load cuda` put on PATH must not be hidden by /usr/local/cuda.
gpu_detect "$TORCH_CUDA" "$TORCH_NCCL" "$HAS_GPU" "$CACHE/nccl-home" \
  || die "Horovod's GPU flavour cannot be built: $GPU_WHY (HVD_BA_GPU=0 builds the CPU flavour)"
say "horovod flavour: $GPU_WHY"
if [ -z "$GPU_OPS" ] && [ -d /usr/local/cuda ]; then
  export PATH=/usr/local/cuda/bin:$PATH CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} CUDAToolkit_ROOT=${CUDAToolkit_ROOT:-/usr/local/cuda}
fi
if [ -n "$GPU_OPS" ]; then
  export CUDA_HOME=$GPU_CUDA_HOME CUDAToolkit_ROOT=$GPU_CUDA_HOME PATH=$GPU_CUDA_HOME/bin:$PATH
  export HOROVOD_NCCL_LINK=$GPU_NCCL_LINK
  if [ -n "$GPU_NCCL_INCLUDE" ]; then
    export HOROVOD_NCCL_INCLUDE=$GPU_NCCL_INCLUDE HOROVOD_NCCL_LIB=$GPU_NCCL_LIB
  else
    export HOROVOD_NCCL_HOME=$GPU_NCCL_HOME
  fi
fi
FLAVOR=${GPU_OPS:+nccl}; FLAVOR=${FLAVOR:-cpu}
KEY="horovod-$HOROVOD-torch$TORCH-$PYTAG-$FLAVOR"
WHEEL_DIR="$CACHE/wheels/$KEY"

horovod_ok() {
  "$PY" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
assert m.version("horovod") == "$HOROVOD"
import horovod.torch as hvd
assert hvd.gloo_built() and hvd.mpi_built()
# On a GPU build an installed Horovod without NCCL is not "present" (its CUDA path copies to the host).
assert "$GPU_OPS" != "NCCL" or hvd.nccl_built()
PYEOF
}
build_horovod() {
  local src; src=$(mktemp -d)
  if [ -n "${HVD_BA_HOROVOD_SDIST:-}" ]; then  # offline build nodes: a source tarball carried in
    cp "$HVD_BA_HOROVOD_SDIST" "$src/horovod-$HOROVOD.tar.gz"
  else
    "$PY" -m pip download "horovod==$HOROVOD" --no-deps --no-binary :all: -d "$src"
  fi
  tar xzf "$src/horovod-$HOROVOD.tar.gz" -C "$src"
  local dir="$src/horovod-$HOROVOD"
  # torch 2.14 headers need C++20 in the extension; the rest of Horovod builds as C++17.
  sed -i 's/^set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$dir/CMakeLists.txt"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$dir/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 20' "$dir/horovod/torch/CMakeLists.txt"
  # No debug information (RelWithDebInfo's -g): a third less compile time for the files that
  # include torch's headers, and a 73 MB library that is mostly DWARF becomes a few MB.
  sed -i 's/^string(REPLACE "-O2" "-O3" CMAKE_\(C\|CXX\|CUDA\)_FLAGS_RELWITHDEBINFO .*/&\nstring(REPLACE "-g" "" CMAKE_\1_FLAGS_RELWITHDEBINFO "${CMAKE_\1_FLAGS_RELWITHDEBINFO}")/' "$dir/CMakeLists.txt"
  [ "$(grep -c 'string(REPLACE "-g" ""' "$dir/CMakeLists.txt")" = 3 ]
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS=-j$(nproc) CMAKE_POLICY_VERSION_MINIMUM=3.5
  [ -z "$GPU_OPS" ] || export HOROVOD_GPU_OPERATIONS=$GPU_OPS HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
  rm -rf "$WHEEL_DIR.tmp"; mkdir -p "$WHEEL_DIR.tmp"
  "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$WHEEL_DIR.tmp" "$dir"
  rm -rf "$WHEEL_DIR"; mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"   # publish the cache entry only when complete
  rm -rf "$src"
}
if [ "${HVD_BA_FORCE_HOROVOD_BUILD:-0}" != 1 ] && horovod_ok; then
  say "horovod $HOROVOD: present"
else
  if [ "${HVD_BA_FORCE_HOROVOD_BUILD:-0}" = 1 ] || ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building horovod $HOROVOD against torch $TORCH ($FLAVOR); about 4-6 minutes on 2 cores; log: $LOGS/build_horovod.log"
    step "build horovod" build_horovod
  else
    say "horovod wheel from cache: $WHEEL_DIR"
  fi
  step "install horovod" "$PY" -m pip install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
  horovod_ok || die "horovod installed but 'import horovod.torch' fails or lacks Gloo/MPI; see $LOGS/install_horovod.log"
fi
# horovodrun's launcher (Python, patched in place, no rebuild): a stopped rank's exit status (75)
# is no longer reported as 0 or 137, and how Horovod was built is asked once per build instead of
# at every start (each time an import of torch); see cluster/patch_horovod.py.
"$PY" "$ROOT/cluster/patch_horovod.py" | sed 's/^/setup: /' || die "cluster/patch_horovod.py failed (see above)"
else
  say "horovod: not installed (HVD_BA_BACKEND=torch)"
fi

# ---------------------------------------------------------------- 4. the project
# Checked from / so that the checkout's own folder on sys.path cannot answer for the install.
if (cd / && "$PY" -c 'import hvd_ba, sys, os; sys.exit(os.path.dirname(hvd_ba.__path__[0]) != sys.argv[1])' "$ROOT") 2>/dev/null \
   && [ -x "$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/hvd-ba" ]; then
  say "hvd_ba (editable): present"
else
  # --no-deps: resolving torchvision's requirements here would put pillow back over pillow-simd.
  step "pip install -e ." "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT"
fi

# ---------------------------------------------------------------- 5. pillow-simd, last
# pillow and pillow-simd both install the PIL package; pillow-simd versions end in .postN.
if [ "$BACKEND" = torch ]; then
  say "pillow-simd: not built (HVD_BA_BACKEND=torch); Pillow from its wheel"
elif "$PY" -c "import PIL, sys; sys.exit(PIL.__version__ != '$PILLOW_SIMD')" 2>/dev/null; then
  say "pillow-simd $PILLOW_SIMD: present"
else
  build_pillow_simd() {
    local cc=cc; grep -q avx2 /proc/cpuinfo && cc="cc -mavx2"
    local dir="$CACHE/wheels/pillow-simd-$PILLOW_SIMD-$PYTAG"
    if ! ls "$dir"/pillow_simd-*.whl >/dev/null 2>&1; then
      rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
      # -g0: no debug information (Python's own CFLAGS carry -g): 41 s instead of 61 s on 2 cores.
      # Only pillow-simd from source (`:all:` would build its build dependencies from source too,
      # setuptools included, minutes on a machine without pip's cache); no cached wheel of it
      # (pip keys those by the source, not by CC's -mavx2).
      CC="$cc" CFLAGS="${CFLAGS:+$CFLAGS }-g0" "$PY" -m pip wheel --no-cache-dir --no-deps --no-binary pillow-simd \
        -w "$dir.tmp" "pillow-simd==$PILLOW_SIMD"
      rm -rf "$dir"; mv "$dir.tmp" "$dir"
    fi
    "$PY" -m pip uninstall -y pillow pillow-simd || true
    "$PY" -m pip install --no-deps --force-reinstall "$dir"/pillow_simd-*.whl
  }
  step "pillow-simd" build_pillow_simd
fi
"$PY" -c 'import PIL, torchvision; from PIL import Image, features; assert features.check("jpg"), "no JPEG support"' \
  || die "PIL/torchvision do not import after pillow-simd"
say "PIL $("$PY" -c 'import PIL; print(PIL.__version__)')"

# ---------------------------------------------------------------- 6. verify
if [ "$BACKEND" = torch ]; then
  (cd / && "$PY" - <<'PYEOF') || die "the torch backend does not start: torch.distributed without Gloo, or hvd_ba does not import"
import torch.distributed as td, hvd_ba.dist, hvd_ba.train.run
assert td.is_available() and td.is_gloo_available()
PYEOF
  TORCHRUN=$("$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "torchrun"))')
  [ -x "$TORCHRUN" ] || die "torchrun not found next to $PY"
  say "torch.distributed: gloo$("$PY" -c 'import torch.distributed as td; print(", nccl" if td.is_nccl_available() else "")'); launch with $TORCHRUN, srun or mpirun and --set run.backend=torch"
else
  HVDRUN=$("$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "horovodrun"))')
  [ -x "$HVDRUN" ] || HVDRUN=horovodrun
  check=$("$HVDRUN" --check-build 2>&1) || { echo "$check" >&2; die "horovodrun --check-build failed"; }
  for fw in "PyTorch" "Gloo" "MPI"; do
    echo "$check" | grep -qE "\[X\] $fw\b" || { echo "$check" >&2; die "horovodrun --check-build does not list $fw as built"; }
  done
  echo "$check" | sed -n '/Available Frameworks/,$p' | sed 's/^/setup:   /'
fi
say "done in $((SECONDS - t0)) s"
