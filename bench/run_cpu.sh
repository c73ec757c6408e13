#!/bin/bash
# The CPU benchmarks (`make bench`): GEMM of the cpu backend against raw OpenBLAS at the
# model's shapes, then decode throughput of the single-process runner on the mini model.
#   BUILD  build directory (default build)
#   QUICK=1 runs the GEMM benchmark with --quick
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export BUILD
BIN=$BUILD/bin
start=$(date +%s)

[ -x "$BIN/afd_gemm_bench" ] || { echo "run_cpu: $BIN/afd_gemm_bench is missing (run make)" >&2; exit 1; }

echo "=== GEMM: cpu backend matmul vs raw cblas_sgemm (1 thread, y = x W^T, bf16 weights) ==="
gemm_args=(--threads 1 --json "$BUILD/bench-gemm.json")
[ "${QUICK:-0}" = 1 ] && gemm_args+=(--quick)
"$BIN/afd_gemm_bench" "${gemm_args[@]}"
echo "(results also in $BUILD/bench-gemm.json)"
echo
echo "=== Decode: afd_run on the mini model, 1 thread ==="
bench/decode_cpu.sh
echo
echo "=== CPU benchmarks done in $(($(date +%s) - start)) s ==="
