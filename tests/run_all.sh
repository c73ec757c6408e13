#!/bin/bash
# Runs every test suite and prints one closing line "N passed, N failed".
#   unit:        $BUILD/tests/test_* (cmocka; its summary lines are counted)
#   integration: tests/integration/test_*.sh and test_*.py, each run in its own process;
#                lines "ok - NAME" / "not ok - NAME" are counted, else the exit status
# A crash (signal, or no summary) counts as a failure. Exit status is non-zero on any
# failure. Set TESTS=pattern to run a subset, TESTS_SKIP=pattern to leave some out.
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export BUILD BIN="$PWD/$BUILD/bin" PY=/usr/bin/python3 ROOT="$PWD"
export MODELS="$PWD/$BUILD/models"
pattern=${TESTS:-}
skip=${TESTS_SKIP:-} # a pattern of suites to leave out
passed=0 failed=0
failures=()
logdir="$BUILD/test-logs"
mkdir -p "$logdir" "$MODELS"

# shared fixtures: the tiny checkpoints every integration test may use
for dt in bf16 fp8; do
    if [ ! -f "$MODELS/tiny-$dt/config.json" ] || [ ! -f "$MODELS/tiny-$dt/tokenizer.json" ]; then
        "$BIN/afd_mkmodel" --out "$MODELS/tiny-$dt" --preset tiny --dtype "$dt" --force >/dev/null ||
            { echo "fixture tiny-$dt: afd_mkmodel failed"; exit 1; }
    fi
done

count_output() { # file exit-status name
    local f=$1 rc=$2 name=$3 p=0 fl=0
    if grep -qE '^\[  (PASSED|FAILED)  \]' "$f"; then
        p=$(grep -E '^\[  PASSED  \] [0-9]+ test' "$f" | awk '{s+=$4} END {print s+0}')
        fl=$(grep -E '^\[  FAILED  \] [0-9]+ test' "$f" | awk '{s+=$4} END {print s+0}')
        [ "$rc" -ne 0 ] && [ "$fl" -eq 0 ] && fl=1
    elif grep -qE '^(not )?ok - ' "$f"; then
        p=$(grep -cE '^ok - ' "$f")
        fl=$(grep -cE '^not ok - ' "$f")
        [ "$rc" -ne 0 ] && [ "$fl" -eq 0 ] && fl=1
    else
        if [ "$rc" -eq 0 ]; then p=1; else fl=1; fi
    fi
    passed=$((passed + p))
    failed=$((failed + fl))
    if [ "$fl" -ne 0 ]; then
        failures+=("$name")
        echo "FAIL $name (exit $rc): last lines of $f"
        tail -n 25 "$f" | sed 's/^/    /'
    else
        printf 'ok   %-40s %d passed\n' "$name" "$p"
    fi
}

run_one() { # name command...
    local name=$1
    shift
    [ -n "$pattern" ] && [[ "$name" != *$pattern* ]] && return
    [ -n "$skip" ] && [[ "$name" == *$skip* ]] && return
    local log="$logdir/${name//\//_}.log" rc
    local t0=$SECONDS
    TEST_TMP=$(mktemp -d) "$@" >"$log" 2>&1
    rc=$?
    count_output "$log" "$rc" "$name"
    [ $((SECONDS - t0)) -gt 60 ] && echo "     ($name took $((SECONDS - t0)) s)"
}

for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    run_one "unit/$(basename "$t")" "$t"
done
for t in tests/integration/test_*.sh tests/integration/test_*.py; do
    [ -f "$t" ] || continue
    case "$t" in
    *.py) run_one "integration/$(basename "$t")" "$PY" "$t" ;;
    *) run_one "integration/$(basename "$t")" bash "$t" ;;
    esac
done

# the CUDA checks need a GPU: tests/cuda/run.sh runs them where there is one (the same
# checks run on the CPU emulator in integration/test_cuda_emu.sh)
if [ -z "$pattern" ]; then
    if [ ! -f "$BUILD/lib/libafdcuda.so" ] || [ ! -x "$BUILD/tests/cuda_check" ]; then
        echo "skip CUDA checks: this build has no CUDA backend (CUDA=0, or no nvcc)"
    elif why=$("$BUILD/tests/cuda_check" --probe 2>&1); then
        echo "note: a GPU is usable here: tests/cuda/run.sh runs the CUDA checks"
    else
        echo "skip CUDA checks (tests/cuda/run.sh needs a GPU): $(echo "$why" | tail -n 1)"
    fi
fi

if [ ${#failures[@]} -ne 0 ]; then
    echo "failed: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
