#!/bin/bash
# The fuzz targets of tests/fuzz (docs/fuzzing.md): builds them with clang (libFuzzer,
# ASan, UBSan), runs each for FUZZ_SECONDS (default 10), two at a time, from its seed
# corpus into a scratch corpus, then replays every saved crash reproducer of tests/fuzz/regressions.
# One line per target: "ok - fuzz_<target>: N execs, cov C, 0 crashes".
set -u
cd "${ROOT:-$(dirname "$0")/../..}" || exit 2
build=${BUILD:-build}
tmp=${TEST_TMP:-$(mktemp -d)}
if ! make --no-print-directory -s -j2 BUILD="$build" fuzz-build >"$tmp/build.log" 2>&1; then
    echo "not ok - fuzz targets build (clang with libFuzzer: scripts/deps.sh)"
    tail -n 20 "$tmp/build.log" | sed 's/^/    /'
    exit 1
fi
echo "ok - fuzz targets build"
tests/fuzz/run.sh --build "$build" --seconds "${FUZZ_SECONDS:-10}" --jobs 2 --work "$tmp/corpus"
