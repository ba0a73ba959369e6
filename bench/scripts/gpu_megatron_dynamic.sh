#!/usr/bin/env bash
# The GPU tests of issue 14, megatron-core 0.19.2 (Python 3.12) with FlashAttention-4: the refit of Megatron's
# running dynamic inference engine (tests/gpu/test_megatron_dynamic.py: one GPU, two CPU trainer ranks, real
# NIXL) and the Publisher on Megatron DDP + the distributed optimizer (tests/gpu/test_megatron_ddp.py: two GPUs
# for TP1 x DP2, four for its other layouts; skipped with fewer).
#
# The wheels do not fit one device call's 64 MiB carry (nvidia-cutlass-dsl-libs-cu13 alone is 92 MB), so
# they travel in three git-ignored folders, in three calls made back to back while the machine stays
# warm (30 s after each call); each call stages its part in /tmp/dynwheels, the last one installs and runs.
#
# 1. On the CPU machine, from the repository root (needs network; ~140 MB):
#      bash bench/scripts/gpu_megatron_dynamic.sh wheels        (PIP="python3 -m pip" without a .venv)
#    -> .whl/dyn-a (cutlass-dsl-libs-cu13 part 1 + the small wheels), .whl/dyn-b (parts 2-3),
#       .whl/dyn-c (nixl-cu13 slimmed as in gpu_env.sh, nixl, grpcio)
# 2. With the device tool (nvidia-h200: torch 2.11 + CUDA 13, Python 3.12; transformers, safetensors,
#    msgpack, einops, cuda-bindings and pytest are in its image), three calls in a row:
#      run(kind="nvidia-h200", carry=[".whl/dyn-a"], command="bash bench/scripts/gpu_megatron_dynamic.sh stage")
#      run(carry=[".whl/dyn-b"], command="bash bench/scripts/gpu_megatron_dynamic.sh stage")
#      run(carry=[".whl/dyn-c"], command="bash bench/scripts/gpu_megatron_dynamic.sh stage && \
#          bash bench/scripts/gpu_megatron_dynamic.sh run")
#    A call that lands on a fresh machine (the previous one was given back) finds its earlier parts
#    missing: `run` says which; start again from the first call.
# Ran on nvidia-h200-x2 on 2026-11-30: both dynamic-engine cases and both TP1 x DP2 DDP cases passed.
# Elsewhere: `run` on any machine with a GPU where those wheels (or the packages) are installed.
# `run` writes the refit reports (stall vs install) to $OUT/megatron_dynamic.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=/tmp/dynwheels
CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
SMALL=(megatron-core==0.19.2 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
       nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
       quack-kernels==0.6.5 pyzmq==27.3.0)
PIP_TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
            --platform manylinux2014_x86_64)

case "${1:-}" in
wheels)
  PIP=${PIP:-.venv/bin/pip}
  rm -rf .whl/dyn-a .whl/dyn-b .whl/dyn-c && mkdir -p .whl/dyn-a .whl/dyn-b .whl/dyn-c
  $PIP download "${PIP_TARGET[@]}" -d .whl/dyn-a "${SMALL[@]}"
  tmp=$(mktemp -d)
  $PIP download "${PIP_TARGET[@]}" -d "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
  (cd "$tmp" && sha256sum "$CU13" > "$CU13.sha256" && split -b 40M -d "$CU13" "$CU13.part")
  mv "$tmp/$CU13.part00" "$tmp/$CU13.sha256" .whl/dyn-a/
  mv "$tmp"/"$CU13".part0[12] .whl/dyn-b/
  rm -rf "$tmp"
  $PIP download "${PIP_TARGET[@]}" -d .whl/dyn-c nixl-cu13==1.5.1 nixl==1.5.1 grpcio==1.85.3
  zip -q -d .whl/dyn-c/nixl_cu13-*.whl 'nixl_ep_cu13/*' 'nixl_cu13.libs/ucx/libucx_perftest*'
  du -sh .whl/dyn-a .whl/dyn-b .whl/dyn-c
  ;;
stage)
  mkdir -p "$STAGE"
  found=0
  for d in .whl/dyn-a .whl/dyn-b .whl/dyn-c; do
    if [ -d "$d" ]; then cp "$d"/* "$STAGE"/; found=1; fi
  done
  [ "$found" = 1 ] || { echo "no .whl/dyn-* folder was carried" >&2; exit 2; }
  ls "$STAGE"
  ;;
run)
  if [ ! -f "$STAGE/$CU13" ]; then
    for p in "$STAGE/$CU13.part00" "$STAGE/$CU13.part01" "$STAGE/$CU13.part02" "$STAGE/$CU13.sha256"; do
      [ -f "$p" ] || { echo "missing $p: this machine did not get every staged part; start again" >&2; exit 2; }
    done
    cat "$STAGE/$CU13".part0[012] > "$STAGE/$CU13"
    (cd "$STAGE" && sha256sum -c "$CU13.sha256")
    rm -f "$STAGE/$CU13".part0[012]
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/*.whl
  # A --target install does not run the cutlass-dsl wheel's .pth file: its packages go on the path here.
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/server:$PWD/bench
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y
  [ -n "${OUT:-}" ] && export REFIT_TEST_REPORT="$OUT/megatron_dynamic.json"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
  python3 -c 'import torch, megatron.core as m, nixl; from megatron.core.transformer import attention as a
print("torch", torch.__version__, "cuda", torch.version.cuda, "megatron-core", m.__version__, "FA4", a.HAVE_FA4)'
  shift
  python3 -m pytest tests/gpu/test_megatron_dynamic.py tests/gpu/test_megatron_ddp.py -v -rs -p no:cacheprovider "$@"
  ;;
*)
  echo "usage: $0 wheels | stage | run [pytest args]" >&2
  exit 2
  ;;
esac
