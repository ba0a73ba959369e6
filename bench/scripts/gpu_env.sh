# Source this on a GPU machine of the device tool (PyTorch 2.11 + CUDA 13, Python 3.12, no network):
# installs the carried wheels (.whl/: nixl-cu13, nixl, megatron-core) and points Python at the repo.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/server:$PWD/bench PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
