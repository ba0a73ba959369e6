# Source this on a GPU machine of the device tool (PyTorch 2.11 + CUDA 13, Python 3.12, no network):
# installs the carried wheels from .whl/ and points Python at the repository.
#
# .whl/ (git-ignored, carried with the run) was made on the CPU machine with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       nixl-cu13==1.5.1 nixl==1.5.1 megatron-core==0.16.1 grpcio==1.85.3
#   zip -d .whl/nixl_cu13-*.whl 'nixl_ep_cu13/*' 'nixl_cu13.libs/ucx/libucx_perftest*'
# (the expert-parallel kernels and UCX perftest are unused by refit; dropping them takes the wheel
# from 59 MB to 29 MB so grpcio >= 1.85.1, which the generated stubs need, fits the 64 MiB carry).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/server:$PWD/bench PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
