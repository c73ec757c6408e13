#!/bin/bash
# The cuda backend on the CPU emulator (tests/cuda/emu): the backend's own sources and
# kernels, built as $BUILD/emu/lib/libafdcuda.so against an emulated CUDA runtime and
# cuBLASLt, through the same checks a GPU run makes (tests/cuda/run.sh): every kernel
# against the cpu backend (cuda_check), a tiny checkpoint through afd_run (model_check)
# and whole clusters whose nodes run --backend cuda (cluster_check). The emulator is
# strict where a GPU is silent (device memory the host cannot touch, streams that run
# only when waited for, checked copies and launches); its own checks come first. Some
# runs change the emulator's thread order, the scale layout its block-scaled GEMM reads,
# or take that GEMM away (the backend's bf16 fallback), or ask for the tensor-core
# decode attention.
set -u
cd "$ROOT"
lib="$ROOT/$BUILD/emu/lib/libafdcuda.so"
if [ ! -f "$lib" ] || [ ! -x "$ROOT/$BUILD/emu/emu_selftest" ]; then
    echo "# no emulator in this build ($BUILD: the sanitizer builds leave it out)"
    exit 0
fi
export AFD_CUDA_LIB=$lib
check="$ROOT/$BUILD/tests/cuda_check"
fails=0

step() { # name command...: its ok/not ok lines, prefixed; a crash or a bad exit fails it
    local name=$1 log="$TEST_TMP/$1.log" rc
    shift
    "$@" >"$log" 2>&1
    rc=$?
    sed -n 's/^\(not ok\|ok\) - /\1 - '"$name"': /p' "$log"
    if [ "$rc" -ne 0 ]; then
        grep -q '^not ok - ' "$log" || echo "not ok - $name: exit $rc"
        echo "# last lines of $name:"
        tail -n 15 "$log" | sed 's/^/#   /'
        fails=$((fails + 1))
    elif ! grep -q '^ok - ' "$log"; then
        echo "not ok - $name: no check ran"
        fails=$((fails + 1))
    fi
}

for order in forward reverse random; do
    step "selftest_$order" env KN_EMU_ORDER=$order "$BUILD/emu/emu_selftest"
done
step kernels "$check"
step kernels_reverse_inner_scales env KN_EMU_ORDER=reverse KN_EMU_SCALE_X=inner_fast \
    KN_EMU_SCALE_W=outer_tight "$check" --quick
step kernels_no_fp8_gemm env KN_EMU_FP8=0 "$check" --quick matmul
step attention_tc_random env AFD_CUDA_ATTN=tc KN_EMU_ORDER=random "$check" --quick attention
M="$MODELS"
[ -f "$M/blk128-fp8/config.json" ] ||
    "$BIN/afd_mkmodel" --out "$M/blk128-fp8" --preset tiny --dtype fp8 --hidden 512 \
        --share-q 256 --heads 4 --head-dim 128 --moe-inter 256 --share-expert 256 \
        --dense-inter 512 --vocab 1024 --force >/dev/null
step model python3 tests/cuda/model_check.py "$BIN" "$M"
step cluster python3 tests/cuda/cluster_check.py "$BIN" "$M"
[ "$fails" -eq 0 ]
