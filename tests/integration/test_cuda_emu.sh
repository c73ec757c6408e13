#!/bin/bash
# The cuda backend on the CPU emulator (tests/cuda/emu): the backend's own sources and
# kernels, built as $BUILD/emu/lib/libafdcuda.so against an emulated CUDA runtime and
# cuBLASLt, through the same checks a GPU run makes (tests/cuda/run.sh): every kernel
# against the cpu backend (cuda_check), a tiny checkpoint through afd_run (model_check)
# and whole clusters whose nodes run --backend cuda (cluster_check). The emulator is
# strict where a GPU is silent (device memory the host cannot touch, streams that run
# only when waited for, checked copies and launches, guard pages after every allocation
# when asked); its own checks come first. Some
# runs change the emulator's thread order or the order its streams run in, the scale
# layout its block-scaled GEMM reads, or take that GEMM away (the backend's bf16
# fallback), or ask for the tensor-core decode attention or the grouped expert GEMMs.
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

ran() { # name command...: ok when it exits 0 (a program without check lines)
    local name=$1 log="$TEST_TMP/$1.log"
    shift
    if "$@" >"$log" 2>&1; then
        echo "ok - $name: $(tail -n 1 "$log" | cut -c1-160)"
    else
        echo "not ok - $name: exit $?"
        tail -n 15 "$log" | sed 's/^/#   /'
        fails=$((fails + 1))
    fi
}

for order in forward reverse random; do
    step "selftest_$order" env KN_EMU_ORDER=$order "$BUILD/emu/emu_selftest"
done
step selftest_shuffled_streams env KN_EMU_STREAMS=shuffle "$BUILD/emu/emu_selftest"
step selftest_guard_pages env KN_EMU_GUARD=1 "$BUILD/emu/emu_selftest"
step kernels "$check"
step kernels_reverse_inner_scales env KN_EMU_ORDER=reverse KN_EMU_SCALE_X=inner_fast \
    KN_EMU_SCALE_W=outer_tight "$check" --quick
step kernels_no_fp8_gemm env KN_EMU_FP8=0 "$check" --quick matmul
step kernels_grouped_moe env AFD_CUDA_MOE=grouped KN_EMU_ORDER=random "$check" --quick matmul
# every allocation against a guard page: a kernel that reads or writes past the end of a
# buffer dies naming the kernel, its block and thread and the allocation
step kernels_guard_pages env KN_EMU_GUARD=1 "$check" --quick
# two devices without NCCL: the ranks' partial sums cross by peer copies
step group_two_devices env KN_EMU_DEVICES=2 AFD_CUDA_NCCL=0 "$check" group
step attention_tc_random env AFD_CUDA_ATTN=tc KN_EMU_ORDER=random "$check" --quick attention
# one decode layer through the ops table as the nodes run it (run.sh's layer step, small)
small=(--hidden 512 --heads 16 --head-dim 128 --share-q 256 --experts 8 --experts-here 8
    --moe-inter 512 --share-inter 256 --tokens 64 --batch 4 --context 40 --reps 1)
ran layer_bench_bf16 "$BIN/afd_layer_bench" --backend cuda --dtype bf16 "${small[@]}"
ran layer_bench_fp8_tp2 "$BIN/afd_layer_bench" --backend cuda --dtype fp8 --tp 2 \
    "${small[@]}" --experts-here 4
ran layer_bench_bf16_grouped env AFD_CUDA_MOE=grouped "$BIN/afd_layer_bench" --backend cuda \
    --dtype bf16 "${small[@]}"
ran layer_bench_fp8_grouped env AFD_CUDA_MOE=grouped "$BIN/afd_layer_bench" --backend cuda \
    --dtype fp8 "${small[@]}"
M="$MODELS"
[ -f "$M/blk128-fp8/config.json" ] ||
    "$BIN/afd_mkmodel" --out "$M/blk128-fp8" --preset tiny --dtype fp8 --hidden 512 \
        --share-q 256 --heads 4 --head-dim 128 --moe-inter 256 --share-expert 256 \
        --dense-inter 512 --vocab 1024 --force >/dev/null
step model python3 tests/cuda/model_check.py "$BIN" "$M"
# the clusters include the nodes sending and receiving device memory (--data-plane device):
# the emulator's device memory is host memory, which the host's UCX moves when asked
export CLUSTER_CHECK_DEVICE_HOST=1
step cluster python3 tests/cuda/cluster_check.py "$BIN" "$M"
# the streams' work in a random order a device could take (other streams run early): a
# missing wait between micro-batches, ranks or copies shows as a wrong answer; the seed
# is in the step's name, to run it again. With guard pages after every allocation, too.
seed=$((RANDOM * 32768 + RANDOM))
step "cluster_shuffled_streams_guard_pages_seed_$seed" env KN_EMU_STREAMS=shuffle \
    KN_EMU_SEED=$seed KN_EMU_GUARD=1 python3 tests/cuda/cluster_check.py "$BIN" "$M"
step cluster_two_devices env KN_EMU_DEVICES=2 AFD_CUDA_NCCL=0 CLUSTER_CHECK_GPUS=2 \
    python3 tests/cuda/cluster_check.py "$BIN" "$M" two_devices
[ "$fails" -eq 0 ]
