#!/usr/bin/env bash
# The GPU-only test of the Publisher on Megatron DDP + the distributed optimizer (tests/gpu/test_megatron_ddp.py):
# trainer ranks (one per GPU, NCCL) and a receiver in the test process. Layouts: TP1 x DP2 (2 GPUs);
# PP2 x VPP2 x DP2 and TP2 x DP2 (4 GPUs; skipped with fewer). Each with overlap_param_gather on and off.
#
# On the device tool's nvidia-h200-x2 or nvidia-h200-x4 (PyTorch 2.11 + CUDA 13, Python 3.12; megatron-core
# 0.16.1, nixl 1.5.1 and grpcio carried as wheels in .carry-1/, see bench/scripts/gpu_env.sh for how such
# wheels are made):
#   run(kind="nvidia-h200-x4", carry=[".carry-1"], command=
#     "bash .carry-1/stage.sh >/dev/null 2>&1; . /tmp/carry/env.sh && bash bench/scripts/gpu_megatron_ddp.sh")
# Elsewhere: any environment with refit's dependencies and two or four GPUs, from the repository root.
# Extra arguments go to pytest (e.g. -k tp1-dp2). REFIT_TEST_RECEIVER_GPU=1 puts the test's receiver on
# GPU 1 (default 0; the trainer ranks use GPUs 0 .. world-1).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/server:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, megatron.core as m, nixl; print("torch", torch.__version__, "cuda", torch.version.cuda, "megatron-core", m.__version__)' || true
python3 -m pytest tests/gpu/test_megatron_ddp.py -v -rs -p no:cacheprovider "$@"
