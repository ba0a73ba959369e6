#!/usr/bin/env bash
# Issue 11's GPU figures in one call of the device tool: every case of its "numbers to reach" that the
# machine's GPUs allow, over CUDA IPC (the default on one host) and over NIXL (--cuda-ipc off).
#
#   first:    the CUDA IPC test (tests/gpu/test_cuda_ipc.py), its receiver on the last GPU (a peer
#             mapping when there are two);
#   one GPU:  llama-8gb TP1 -> TP1, trainer and engine processes sharing GPU 0, Megatron and HF layouts
#             (the Megatron layout also with the digest check alternating on and off; the HF layout's
#             QKV copied out of the trainer's memory and staged, alternating), and
#             TP2 -> TP1 with every process on GPU 0 (on one GPU only);
#   two GPUs: also llama-3-8b TP1 -> TP1 across GPUs (with the classic gather + broadcast in the same
#             run) and TP2 -> TP1, each with the digest check alternating on and off.
#
# On the device tool (PyTorch 2.11 + CUDA 13, Python 3.12), with the wheels of bench/scripts/gpu_env.sh
# carried in .whl/:
#   run(carry=[".whl"], command=". bench/scripts/gpu_env.sh && bash bench/scripts/gpu_issue11.sh TAG")
# JSON goes to $OUT (the device tool's folder that comes back), else bench/results, named
# refit_h200x<GPUs>_<shape>_<layout>_<TAG>_ipc_{on,ab,off}.json (on two GPUs the llama-8gb runs' first
# reference is the copy from the other GPU, the second the copy within GPU 0). Budget: ~5.5 min on one
# GPU, ~11 min on two, after the machine's start.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-$(date +%Y%m%d)}
out=${OUT:-bench/results}
export PYTHONPATH=$PWD:$PWD/server:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader || true

bench() {  # bench NAME ARGS...: one refit-bench refit run, its summary lines on stdout (its tail if it fails)
    local name=$1 log
    shift
    log=$(mktemp)
    echo "== $name: refit-bench refit $*"
    if ! python3 -c 'import sys; from refit_bench.cli import main; sys.exit(main())' refit --device cuda \
        --json "$out/$name.json" "$@" > "$log" 2>&1; then
        echo "FAILED: $name"
        tail -20 "$log"
    fi
    grep -E "steady state|copy|classic|digest check|bound|staged pieces" "$log" || true
    rm -f "$log"
}

# The CUDA IPC test first (bit-exact, a killed reader, a racing step): receiver on the last GPU.
REFIT_TEST_RECEIVER_GPU=$((gpus - 1)) bash bench/scripts/gpu_cuda_ipc.sh -q 2>&1 | tail -3 ||
    echo "FAILED: the CUDA IPC test"

for ipc in on off; do
    bench "refit_h200x${gpus}_llama-8gb_megatron_${tag}_ipc_$ipc" --shape llama-8gb --tp 1 --engine-tp 1 --receiver-gpu 0 \
        --engine-scheme megatron --versions 10 --no-verify --no-baseline --cuda-ipc "$ipc"
done
# With the digest check alternating on and off (on: the direct reads copied and checked in one pass).
bench "refit_h200x${gpus}_llama-8gb_megatron_${tag}_digest_ab" --shape llama-8gb --tp 1 --engine-tp 1 --receiver-gpu 0 \
    --engine-scheme megatron --versions 13 --digest-ab --no-baseline
# The HF layout stages QKV: copied out of the trainer's mapped memory and staged, alternating in one run;
# then over NIXL. Trainer TP2 -> engine TP1 with all three processes on GPU 0, alternating the same way.
for ipc in ab off; do
    bench "refit_h200x${gpus}_llama-8gb_hf_${tag}_ipc_$ipc" --shape llama-8gb --tp 1 --engine-tp 1 --receiver-gpu 0 \
        --versions 13 --no-verify --no-baseline --cuda-ipc "$ipc"
done
if [ "$gpus" -eq 1 ]; then  # trainer ranks go to GPU rank % GPUs: on one GPU, all of them on GPU 0
    bench "refit_h200x1_llama-8gb_tp2_gpu0_${tag}_ipc_ab" --shape llama-8gb --tp 2 --engine-tp 1 --receiver-gpu 0 \
        --versions 13 --no-verify --no-baseline --cuda-ipc ab
fi

if [ "$gpus" -ge 2 ]; then
    for ipc in on off; do
        bench "refit_h200x${gpus}_llama-3-8b_tp1_${tag}_ipc_$ipc" --shape llama-3-8b --tp 1 --engine-tp 1 \
            --receiver-gpu 1 --versions 9 --digest-ab --cuda-ipc "$ipc"
        bench "refit_h200x${gpus}_llama-3-8b_tp2_${tag}_ipc_$ipc" --shape llama-3-8b --tp 2 --engine-tp 1 \
            --receiver-gpu 1 --versions 9 --digest-ab --no-baseline --cuda-ipc "$ipc"
    done
else
    echo "one GPU: the two-GPU cases of issue 11 need nvidia-h200-x2"
fi
