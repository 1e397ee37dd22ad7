# hvd_ba: where CUDA and NCCL are, for Horovod's GPU build. Sourced by cluster/setup.sh (and by
# tests, on fake folder trees); defines one function, gpu_detect.
#
#   gpu_detect TORCH_CUDA TORCH_NCCL_DIR HAS_GPU PRIVATE_DIR
#     TORCH_CUDA      torch.version.cuda ("13.0"), empty for a CPU-only torch
#     TORCH_NCCL_DIR  the nvidia-nccl-cu* wheel's folder next to torch (holds lib/libnccl.so.2 and
#                     include/nccl.h), empty if none
#     HAS_GPU         1 when nvidia-smi lists a GPU on this node
#     PRIVATE_DIR     a folder of ours where a linkable NCCL home can be assembled (libnccl.so)
#
# Reads HVD_BA_GPU (auto, the default: build for the GPU when this node has one; 1: build the GPU
# flavour even here, e.g. on a login node, and fail if CUDA or NCCL is missing; 0: CPU only),
# CUDA_HOME, CUDA_PATH, HOROVOD_NCCL_HOME, NCCL_HOME, and HVD_BA_SYSROOT (a prefix for the system
# folders /usr/local/cuda and /usr/lib/x86_64-linux-gnu: tests point it at a fake tree).
#
# Sets GPU_OPS (NCCL or empty), GPU_CUDA_HOME, GPU_NCCL_HOME, GPU_NCCL_LINK (SHARED), and for
# Debian's split layout GPU_NCCL_INCLUDE / GPU_NCCL_LIB (Horovod's HOROVOD_NCCL_INCLUDE/_LIB), GPU_WHY
# (one line: what was found, or what is missing and where it was looked for). Returns 1 only when
# HVD_BA_GPU=1 and the GPU build cannot be made.

_gd_cuda_version() {  # the CUDA release of a toolkit folder: from bin/nvcc, else version.json
    local home=$1 v=""
    if [ -x "$home/bin/nvcc" ]; then
        v=$("$home/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)
    fi
    if [ -z "$v" ] && [ -f "$home/version.json" ]; then  # multi-line JSON: joined first
        v=$(tr -d '\n' <"$home/version.json" | sed -n 's/.*"cuda"[^}]*"version" *: *"\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)
    fi
    echo "$v"
}

_gd_nccl_ok() {  # a folder with include/nccl.h and a libnccl.so* in lib/ or lib64/
    local home=$1
    [ -f "$home/include/nccl.h" ] || return 1
    local f  # either folder will do (one `ls` of both patterns fails when one of them is absent)
    for f in "$home"/lib/libnccl.so* "$home"/lib64/libnccl.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}

_gd_linkable() {  # an NCCL home Horovod's build can link (-lnccl): as is, or a private one with libnccl.so
    local home=$1 private=$2 f lib=""
    for f in "$home"/lib/libnccl.so "$home"/lib64/libnccl.so; do
        [ -e "$f" ] && { echo "$home"; return 0; }
    done
    for f in "$home"/lib/libnccl.so.* "$home"/lib64/libnccl.so.*; do
        [ -e "$f" ] && { lib=$f; break; }
    done
    [ -n "$lib" ] && [ -f "$home/include/nccl.h" ] || return 1
    mkdir -p "$private/include" "$private/lib"
    ln -sfn "$home/include/nccl.h" "$private/include/nccl.h"
    ln -sfn "$lib" "$private/lib/libnccl.so"
    ln -sfn "$lib" "$private/lib/libnccl.so.2"
    echo "$private"
}

gpu_detect() {
    local torch_cuda=$1 torch_nccl=$2 has_gpu=$3 private=$4
    local sys=${HVD_BA_SYSROOT:-} want=${HVD_BA_GPU:-auto}
    GPU_OPS="" GPU_CUDA_HOME="" GPU_NCCL_HOME="" GPU_NCCL_LINK="" GPU_NCCL_INCLUDE="" GPU_NCCL_LIB="" GPU_WHY=""
    case "$want" in auto|0|1) ;; *) GPU_WHY="HVD_BA_GPU='$want': choose auto, 1 or 0"; return 1 ;; esac
    if [ "$want" = 0 ]; then
        GPU_WHY="HVD_BA_GPU=0: CPU build"; return 0
    fi
    if [ "$want" = auto ] && [ "$has_gpu" != 1 ]; then
        GPU_WHY="no GPU on this node: CPU build (HVD_BA_GPU=1 builds the GPU flavour here)"; return 0
    fi
    # HVD_BA_GPU=1, or a node with a GPU: a GPU build that cannot be made stops the set-up (a
    # CPU-only Horovod on a GPU node would copy every gradient to the host).
    local fail=1
    if [ -z "$torch_cuda" ]; then
        GPU_WHY="torch is a CPU build: no GPU build possible"
        [ "$want" = 1 ] && return 1
        return 0
    fi

    # CUDA: nvcc on PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda; its major must be torch's.
    local looked=() cand home="" nvcc
    nvcc=$(command -v nvcc 2>/dev/null || true)
    [ -n "$nvcc" ] && nvcc=$(readlink -f "$nvcc")  # a symlinked nvcc: the toolkit it belongs to
    for cand in ${nvcc:+"$(dirname "$(dirname "$nvcc")")"} ${CUDA_HOME:+"$CUDA_HOME"} ${CUDA_PATH:+"$CUDA_PATH"} \
                "$sys/usr/local/cuda"; do
        looked+=("$cand")
        local v; v=$(_gd_cuda_version "$cand")
        [ -n "$v" ] || continue
        if [ "${v%%.*}" != "${torch_cuda%%.*}" ]; then
            looked[-1]="$cand (CUDA $v, torch needs ${torch_cuda%%.*}.x)"; continue
        fi
        home=$cand; break
    done
    if [ -z "$home" ]; then
        GPU_WHY="no CUDA ${torch_cuda%%.*}.x toolkit found (looked for nvcc on PATH, CUDA_HOME, CUDA_PATH, $sys/usr/local/cuda: ${looked[*]:-none}); load the CUDA module or set CUDA_HOME"
        return $fail
    fi

    # NCCL: HOROVOD_NCCL_HOME, NCCL_HOME, torch's own nvidia-nccl wheel, the system.
    local nccl="" nlooked=()
    for cand in ${HOROVOD_NCCL_HOME:+"$HOROVOD_NCCL_HOME"} ${NCCL_HOME:+"$NCCL_HOME"}; do
        nlooked+=("$cand")
        if _gd_nccl_ok "$cand"; then nccl=$(_gd_linkable "$cand" "$private"); break; fi
    done
    if [ -z "$nccl" ] && [ -n "$torch_nccl" ]; then
        nlooked+=("$torch_nccl (torch's wheel)")
        if [ -f "$torch_nccl/include/nccl.h" ] && ls "$torch_nccl"/lib/libnccl.so* >/dev/null 2>&1; then
            # The wheel holds lib/libnccl.so.2 only; Horovod's build links -lnccl, so a private
            # home with libnccl.so (and the header) pointing at the wheel's files.
            local lib; lib=$(ls "$torch_nccl"/lib/libnccl.so* | head -1)
            mkdir -p "$private/include" "$private/lib"
            ln -sfn "$torch_nccl/include/nccl.h" "$private/include/nccl.h"
            ln -sfn "$lib" "$private/lib/libnccl.so"
            ln -sfn "$lib" "$private/lib/libnccl.so.2"
            nccl=$private
        fi
    fi
    if [ -z "$nccl" ]; then  # the toolkit's own folder, then Debian's libnccl-dev layout
        nlooked+=("$home")
        if _gd_nccl_ok "$home"; then
            nccl=$(_gd_linkable "$home" "$private")
        else
            nlooked+=("$sys/usr/include + $sys/usr/lib/x86_64-linux-gnu")
            if [ -f "$sys/usr/include/nccl.h" ] && ls "$sys/usr/lib/x86_64-linux-gnu"/libnccl.so* >/dev/null 2>&1; then
                GPU_NCCL_INCLUDE="$sys/usr/include" GPU_NCCL_LIB="$sys/usr/lib/x86_64-linux-gnu"
                nccl="$sys/usr"
            fi
        fi
    fi
    if [ -z "$nccl" ]; then
        GPU_WHY="no NCCL found (looked in HOROVOD_NCCL_HOME, NCCL_HOME, torch's nvidia-nccl wheel, the system: ${nlooked[*]}); install nvidia-nccl-cu${torch_cuda%%.*} or set NCCL_HOME"
        return $fail
    fi
    GPU_OPS=NCCL GPU_CUDA_HOME=$home GPU_NCCL_HOME=$nccl GPU_NCCL_LINK=SHARED
    GPU_WHY="GPU build: CUDA $(_gd_cuda_version "$home") at $home, NCCL at $nccl"
    return 0
}
