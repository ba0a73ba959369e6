#!/usr/bin/env bash
# Generate refit/proto/catalog_pb2{,_grpc}.py and catalog_pb2.pyi from proto/refit/proto/catalog.proto.
# The .proto sits at refit/proto/ relative to the -I root, so the generated stub imports
# `from refit.proto import catalog_pb2` without any fix-ups.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repository root; tests pass a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
"${PYTHON:-python}" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/refit/proto/catalog.proto
