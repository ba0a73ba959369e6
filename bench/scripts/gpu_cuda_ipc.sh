#!/usr/bin/env bash
# The GPU-only test of reads over CUDA IPC (tests/gpu/test_cuda_ipc.py): a trainer rank (Megatron DDP,
# GPU 0) and a receiver in the test process on the same host, bit-exact over CUDA IPC and over NIXL.
#
# On the device tool's nvidia-h200 (PyTorch 2.11 + CUDA 13, Python 3.12), with the wheels of
# bench/scripts/gpu_env.sh carried in .whl/:
#   run(carry=[".whl"], command=". bench/scripts/gpu_env.sh && bash bench/scripts/gpu_cuda_ipc.sh")
# Elsewhere: any environment with refit's dependencies and a GPU, from the repository root. Extra
# arguments go to pytest. REFIT_TEST_RECEIVER_GPU=1 puts the receiver on GPU 1 (peer copies).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/server:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
python3 -m pytest tests/gpu/test_cuda_ipc.py -v -rs -p no:cacheprovider "$@"
