#!/bin/bash
# The CPU benchmarks (`make bench`, about 30 minutes on 2 cores): GEMM of the cpu backend
# against raw OpenBLAS at the model's shapes; decode throughput of the single-process runner
# on the mini model; the data-plane transfer rate next to ucx_perftest; and the AFD pipeline
# (1A1F, a core each) against the single-process runner on one core.
#   BUILD  build directory (default build)
#   QUICK=1 runs the GEMM benchmark with --quick
#   ONLY="gemm decode xfer tok pipeline afd" picks some of them (afd: afd_bench sweep, 1A1F/1A2F/2A2F)
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export BUILD
BIN=$BUILD/bin
start=$(date +%s)

[ -x "$BIN/afd_gemm_bench" ] || { echo "run_cpu: $BIN/afd_gemm_bench is missing (run make)" >&2; exit 1; }

ONLY=${ONLY:-"gemm decode xfer tok pipeline afd"}
want() { [[ " $ONLY " == *" $1 "* ]]; }
if want gemm; then
    echo "=== GEMM: cpu backend matmul vs raw cblas_sgemm (1 thread, y = x W^T, bf16 weights) ==="
    gemm_args=(--threads 1 --json "$BUILD/bench-gemm.json")
    [ "${QUICK:-0}" = 1 ] && gemm_args+=(--quick)
    "$BIN/afd_gemm_bench" "${gemm_args[@]}"
    echo "(results also in $BUILD/bench-gemm.json)"
    echo
fi
if want decode; then
    echo "=== Decode: afd_run on the mini model, 1 thread ==="
    bench/decode_cpu.sh
    echo
fi
if want xfer; then
    echo "=== Data plane: net_ucx_send against ucx_perftest (ucp_am_bw) ==="
    bench/xfer_bench.sh
    echo
fi
if want pipeline; then
    echo "=== AFD pipeline: 1A1F pinned against afd_run on one core ==="
    # batch 3072, m = 3 and 2, three rounds each against afd_run, with the two ceilings
    /usr/bin/python3 bench/pipeline_cpu.py
    echo
fi
if want tok; then
    echo "=== Tokenizer: encode, decode and streaming-detokenize MB/s (8192-id BPE over the bundled sample) ==="
    "$BIN/afd_tok_bench" --mb 3
    echo
fi
if want afd; then
    echo "=== AFD decode: afd_bench sweep on the mini model (1A1F, 1A2F, 2A2F) against afd_run ==="
    [ -f "$BUILD/models/mini-bf16/model.safetensors.index.json" ] ||
        "$BIN/afd_mkmodel" --out "$BUILD/models/mini-bf16" --preset mini --dtype bf16 --force >/dev/null
    "$BIN/afd_bench" sweep --model "$BUILD/models/mini-bf16" --af 1x1,1x2,2x2 --micro-batches 2 \
        --batches 16,32 --contexts 64 --tokens 24 --out-dir "$BUILD/bench-afd"
    echo
fi
echo "=== CPU benchmarks done in $(($(date +%s) - start)) s ==="
