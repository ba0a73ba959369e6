#!/usr/bin/env bash
# The GPU-only test of the Publisher on Megatron DDP + the distributed optimizer (tests/gpu/test_megatron_ddp.py):
# two trainer ranks (TP1 DP2, NCCL) and a receiver in the test process, on a machine with two GPUs.
# megatron-core's DDP and distributed optimizer need CUDA tensors, so this test cannot run on the CPU machine.
#
# On the device tool's nvidia-h200-x2 (PyTorch 2.11 + CUDA 13, Python 3.12; megatron-core 0.16.1, nixl 1.5.1
# and grpcio carried as wheels in .carry-1/, see bench/scripts/gpu_env.sh for how such wheels are made):
#   run(kind="nvidia-h200-x2", carry=[".carry-1"], command=
#     "bash .carry-1/stage.sh >/dev/null 2>&1; . /tmp/carry/env.sh && bash bench/scripts/gpu_megatron_ddp.sh")
# Elsewhere: any environment with refit's dependencies and two GPUs, from the repository root.
# REFIT_TEST_RECEIVER_GPU=1 puts the test's receiver on GPU 1 (default 0; the trainer ranks use GPUs 0 and 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/server:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, megatron.core as m, nixl; print("torch", torch.__version__, "cuda", torch.version.cuda, "megatron-core", m.__version__)' || true
python3 -m pytest tests/gpu/test_megatron_ddp.py -v -p no:cacheprovider "$@"
