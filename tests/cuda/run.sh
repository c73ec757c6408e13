#!/bin/bash
# The CUDA backend on a GPU machine, in one go (under 5 minutes on one H200):
#   1. build with CUDA=1 (sm_90, warnings as errors) into $BUILD (default build/cuda);
#   2. every kernel check (cuda_check: the cuda backend against the cpu backend), each
#      in its own process with its own timeout, printing its max error and tolerance;
#   3. the whole-model check: tiny checkpoints through afd_run --backend cuda vs cpu;
#   4. the GPU benchmarks at Step3 shapes (cuda_bench) and the projected throughput;
#   then, while the run is within BUDGET_S (270 s), each skipped with a line otherwise:
#   5. one decode layer through the ops table at Step3 shapes (afd_layer_bench), and the
#      FFN share's fp8 and bf16 expert GEMMs per expert and grouped in one launch;
#   6. whole clusters on loopback with cuda nodes (FFN with one and two tensor-parallel
#      ranks) against afd_run on the cpu (cluster_check.py);
#   7. a 1A1F cluster decoding the mini model on the GPU (afd_bench decode), without and
#      with the attention node's decode layers as CUDA graphs;
#   8. compute-sanitizer memcheck over the small checks, when the tool is there.
# A failing step never stops the next one. The summary goes to SUMMARY_DIR/cuda_summary.txt
# (SUMMARY_DIR: the first argument, else $OUT, else $BUILD), the whole log beside it.
# On an image without this project's libraries, first run tests/cuda/prepare_deps.sh
# where apt works and bring build/cuda-deps (or $AFD_CUDA_DEPS) along: its packages are unpacked into a
# private prefix here. Exit status: 0 when every step passed.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${BUILD:-build/cuda}
OUTDIR=${1:-${OUT:-$BUILD}}
mkdir -p "$OUTDIR" "$BUILD"
SUMMARY=$OUTDIR/cuda_summary.txt
LOG=$OUTDIR/cuda_log.txt
: >"$SUMMARY"
: >"$LOG"
T0=$SECONDS
failed=0

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: runs CMD with a timeout, its output to the log and the screen;
# its ok/not ok lines and bench figures go to the summary
step() {
    local name=$1 limit=$2 t=$SECONDS rc out
    shift 2
    out=$(mktemp)
    echo "=== $name: $*" >>"$LOG"
    timeout -k 10 "$limit" "$@" >"$out" 2>&1
    rc=$?
    cat "$out" >>"$LOG"
    grep -E '^(ok|not ok) - |^(device|fp8 probe|copy|gemm|attn|layer|moe|projection|#|AFD |  )' \
        "$out" >>"$SUMMARY"
    # the backend's start-up line (device, fp8 probe result, scale layouts), once
    grep -q 'backend cuda:' "$SUMMARY" || grep -m 1 'backend cuda:' "$out" >>"$SUMMARY"
    local status=pass
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="TIMEOUT after ${limit}s"
    elif [ $rc -ne 0 ] || grep -q '^not ok - ' "$out"; then
        status="FAIL (exit $rc)"
        grep -qE '^(ok|not ok) - ' "$out" || tail -n 15 "$out" | sed 's/^/    /' >>"$SUMMARY"
    fi
    [ "$status" = pass ] || failed=$((failed + 1))
    say "[$name] $status in $((SECONDS - t)) s"
    rm -f "$out"
    return 0
}

say "cuda run: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
say "nvcc: $(${NVCC:-/usr/local/cuda/bin/nvcc} --version 2>&1 | tail -n 1)"

# the project's libraries from carried packages, when the image lacks them
MAKEVARS=()
DEPS=${AFD_CUDA_DEPS:-build/cuda-deps}
if { ! [ -f /usr/include/uv.h ] || [ -n "${AFD_CUDA_DEPS_FORCE:-}" ]; } &&
    ls "$DEPS"/*.deb >/dev/null 2>&1; then
    P=/tmp/afd-deps
    mkdir -p $P
    for f in "$DEPS"/*.deb; do dpkg -x "$f" $P; done
    A=x86_64-linux-gnu
    export CPATH=$P/usr/include:$P/usr/include/$A:$P/usr/include/$A/openblas-pthread${CPATH:+:$CPATH}
    export LIBRARY_PATH=$P/usr/lib/$A:$P/usr/lib/$A/openblas-pthread:$P/lib/$A${LIBRARY_PATH:+:$LIBRARY_PATH}
    export LD_LIBRARY_PATH=$LIBRARY_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PATH=$P/usr/bin:$PATH
    MAKEVARS=(LLHTTP_DIR=$P/usr/share/llhttp LLHTTP_INC=$P/usr/share/include/llhttp)
    say "deps: unpacked $(ls "$DEPS"/*.deb | wc -l) packages into $P"
fi

J=$(nproc 2>/dev/null || echo 4)
step build 300 make -j"$J" BUILD="$BUILD" CUDA=1 "${MAKEVARS[@]}" "$BUILD/lib/libafdcuda.so" \
    "$BUILD/bin/afd_run" "$BUILD/bin/afd_mkmodel" "$BUILD/bin/afdctl" "$BUILD/bin/attn_node" \
    "$BUILD/bin/ffn_node" "$BUILD/bin/afd_coordinator" "$BUILD/bin/afd_bench" \
    "$BUILD/bin/afd_layer_bench" "$BUILD/tests/cuda_check" \
    "$BUILD/tests/cuda_bench"
BIN=$ROOT/$BUILD/bin
CHECK=$ROOT/$BUILD/tests/cuda_check
if [ -x "$CHECK" ]; then
    for name in $("$CHECK" --list); do
        step "check $name" 90 "$CHECK" "$name"
    done
    step "check attention (tensor-core decode kernel)" 90 env AFD_CUDA_ATTN=tc "$CHECK" attention
    step "check matmul (grouped expert GEMMs)" 90 env AFD_CUDA_MOE=grouped "$CHECK" matmul
else
    say "[checks] skipped: no cuda_check (the build failed)"
    failed=$((failed + 1))
fi

MODELS=$ROOT/$BUILD/models
mkdir -p "$MODELS"
if [ -x "$BIN/afd_mkmodel" ]; then
    for dt in bf16 fp8; do
        [ -f "$MODELS/tiny-$dt/config.json" ] ||
            "$BIN/afd_mkmodel" --out "$MODELS/tiny-$dt" --preset tiny --dtype $dt --force >>"$LOG" 2>&1
    done
    # every GEMM shape a multiple of 128: fp8 weights stay fp8 on the device
    [ -f "$MODELS/blk128-fp8/config.json" ] ||
        "$BIN/afd_mkmodel" --out "$MODELS/blk128-fp8" --preset tiny --dtype fp8 --hidden 512 \
            --share-q 256 --heads 4 --head-dim 128 --moe-inter 256 --share-expert 256 \
            --dense-inter 512 --vocab 1024 --force >>"$LOG" 2>&1
    step model 150 python3 tests/cuda/model_check.py "$BIN" "$MODELS"
fi

# the figures the issue asks for come before the longer system checks below
if [ -x "$ROOT/$BUILD/tests/cuda_bench" ]; then
    step bench 180 "$ROOT/$BUILD/tests/cuda_bench"
fi

# the rest while the run is within its budget (BUDGET_S, default 270 s): what is skipped
# says so in the summary
BUDGET_S=${BUDGET_S:-270}
later() { # name: whether there is time for it
    if [ $((SECONDS - T0)) -ge "$BUDGET_S" ]; then
        say "[$1] skipped: the run has used $((SECONDS - T0)) s of its ${BUDGET_S} s"
        return 1
    fi
}

# one decode layer through the ops table as the nodes run it, at Step3's shapes: an
# attention GPU's micro-batch (128 sequences at 4K), an FFN GPU's share in 2A2F
if [ -x "$BIN/afd_layer_bench" ] && later layer; then
    step layer 90 "$BIN/afd_layer_bench" --backend cuda --batch 128 --context 4096 \
        --tokens 2048 --experts-here 24 --tp 8 --share-inter 3072
fi
if [ -x "$BIN/afd_mkmodel" ]; then
    later cluster && step cluster 150 python3 tests/cuda/cluster_check.py "$BIN" "$MODELS"
    # the whole system on the GPU: a 1A1F cluster decoding the mini model (272 MB, fp8)
    if later decode; then
        [ -f "$MODELS/mini-fp8/config.json" ] ||
            "$BIN/afd_mkmodel" --out "$MODELS/mini-fp8" --preset mini --dtype fp8 --force \
                >>"$LOG" 2>&1
        step decode 90 "$BIN/afd_bench" decode --model "$MODELS/mini-fp8" --attn 1 --ffn 1 \
            --micro-batches 3 --batch 96 --context 128 --tokens 32 --baseline=false \
            --local-up-arg=--backend --local-up-arg=cuda
    fi
    # the same with the attention node's decode layers replayed as CUDA graphs
    if [ -f "$MODELS/mini-fp8/config.json" ] && later decode-graphs; then
        step "decode graphs" 90 env AFD_CUDA_GRAPHS=1 "$BIN/afd_bench" decode \
            --model "$MODELS/mini-fp8" --attn 1 --ffn 1 --micro-batches 3 --batch 96 \
            --context 128 --tokens 32 --baseline=false --local-up-arg=--backend \
            --local-up-arg=cuda
    fi
fi

# the FFN share, its expert GEMMs one launch per expert (cuBLASLt) and one launch for all
# of them (the grouped kernels), side by side: fp8 (the production weights) first, then bf16
if [ -x "$BIN/afd_layer_bench" ] && later layer-grouped; then
    for dt in fp8 bf16; do
        for moe in segmented grouped; do
            later "layer ffn $dt $moe" || break 2
            step "layer ffn $dt $moe" 60 env AFD_CUDA_MOE=$moe "$BIN/afd_layer_bench" \
                --backend cuda --dtype $dt --batch 8 --context 64 --tokens 2048 \
                --experts-here 24 --tp 8 --share-inter 3072
        done
    done
fi

# memory errors in the kernels, while time is left (memcheck runs kernels far slower)
if command -v compute-sanitizer >/dev/null && [ -x "$CHECK" ]; then
    for name in rmsnorm router gather round embed; do
        [ $((SECONDS - T0)) -lt "$BUDGET_S" ] || break
        step "memcheck $name" 40 compute-sanitizer --tool memcheck --error-exitcode 3 "$CHECK" "$name"
    done
fi

say "cuda run: $failed failing steps, $((SECONDS - T0)) s; log: $LOG"
[ $failed -eq 0 ]
