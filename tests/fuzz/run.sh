#!/bin/bash
# Runs the fuzz targets of $BUILD/fuzz (built by `make fuzz-build`), --jobs at a time
# (default 1), each for a bounded time on its seed corpus, then every saved crash reproducer of
# tests/fuzz/regressions/<target>/ once. Prints one line per target:
#   ok - fuzz_http: 41210 execs, cov 812, 0 crashes
# and "not ok - ..." with the log's tail for a crash, a leak, a hang or an out-of-memory.
# New inputs go to a work corpus (--work, default $BUILD/fuzz/corpus/<target>, kept between
# runs); crash files to $BUILD/fuzz/artifacts/<target>/.
#   run.sh [--build DIR] [--seconds N] [--jobs N] [--work DIR] [--targets "http json ..."]
#          [--no-regressions]
set -u
cd "$(dirname "$0")/../.." || exit 2
build=${BUILD:-build}
seconds=10
work=""
targets=""
regressions=1
jobs=1
while [ $# -gt 0 ]; do
    case "$1" in
    --build) build=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --no-regressions) regressions=0; shift ;;
    *) echo "usage: $0 [--build DIR] [--seconds N] [--jobs N] [--work DIR] [--targets LIST]" \
           "[--no-regressions]" >&2
       exit 2 ;;
    esac
done
case "$seconds$jobs" in '' | *[!0-9]*) echo "--seconds and --jobs take whole numbers" >&2; exit 2 ;; esac
[ "$jobs" -ge 1 ] || jobs=1
[ "$seconds" -ge 1 ] || seconds=1 # libFuzzer reads 0 as "no limit"
fuzz_dir="$build/fuzz"
[ -n "$work" ] || work="$fuzz_dir/corpus"
if [ -z "$targets" ]; then
    for f in tests/fuzz/fuzz_*.c; do
        t=$(basename "$f" .c)
        targets="$targets ${t#fuzz_}"
    done
fi

# the longest input each target may grow (the HTTP one crosses the server's 16 KiB buffer)
max_len() {
    case "$1" in
    http) echo 20000 ;;
    json) echo 8192 ;;
    tokenizer) echo 32768 ;; # the tiny model's tokenizer.json seed is 24 KB
    *) echo 4096 ;;
    esac
}

# one target: its line (and the log's tail on failure) into $fuzz_dir/logs/<target>.result
run_target() {
    local t=$1 bin="$fuzz_dir/fuzz_$1" corpus="$work/$1" art="$fuzz_dir/artifacts/$1"
    local log="$fuzz_dir/logs/$1.log" out="$fuzz_dir/logs/$1.result"
    if [ ! -x "$bin" ]; then
        echo "not ok - fuzz_$t: $bin is missing (make fuzz-build)" >"$out"
        return
    fi
    mkdir -p "$corpus" "$art"
    local before rc execs cov crashes summary
    before=$(find "$art" -type f | wc -l)
    # -close_fd_mask=2: the parsers' own error lines stay quiet (sanitizer reports still show)
    timeout -k 10 $((seconds + 120)) "$bin" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -max_len="$(max_len "$t")" -close_fd_mask=2 -print_final_stats=1 \
        -artifact_prefix="$art/" "$corpus" "tests/fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -oE ' cov: [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+')
    crashes=$(($(find "$art" -type f | wc -l) - before))
    [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ] && crashes=1
    summary="fuzz_$t: ${execs:-0} execs, cov ${cov:-0}, $crashes crashes"
    if [ "$rc" -eq 0 ] && [ "$crashes" -eq 0 ] && [ -n "$execs" ]; then
        echo "ok - $summary" >"$out"
    else
        {
            echo "not ok - $summary (exit $rc; reproducers in $art; log $log)"
            grep -E 'ERROR|SUMMARY|Test unit written|^    #[0-9]+ ' "$log" | head -n 30 |
                sed 's/^/    /'
        } >"$out"
    fi
}

# the JSON target checks text prompts and chat templates with the tiny fixture's tokenizer
if [ -z "${AFD_FUZZ_TOKENIZER+x}" ] && [ -f "$build/models/tiny-bf16/tokenizer_config.json" ]; then
    export AFD_FUZZ_TOKENIZER="$build/models/tiny-bf16"
fi

mkdir -p "$fuzz_dir/logs"
running=0
for t in $targets; do
    rm -f "$fuzz_dir/logs/$t.result"
    run_target "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait
fails=0
for t in $targets; do
    cat "$fuzz_dir/logs/$t.result"
    grep -q '^ok - ' "$fuzz_dir/logs/$t.result" || fails=$((fails + 1))
done

if [ "$regressions" -eq 1 ]; then
    for t in $targets; do
        dir="tests/fuzz/regressions/$t"
        [ -d "$dir" ] || continue
        files=$(find "$dir" -type f ! -name '*.md' | sort)
        [ -n "$files" ] || continue
        n=$(echo "$files" | wc -l)
        log="$fuzz_dir/logs/regressions-$t.log"
        # shellcheck disable=SC2086
        timeout -k 10 300 "$fuzz_dir/fuzz_$t" -timeout=10 -rss_limit_mb=2048 $files >"$log" 2>&1
        rc=$?
        if [ "$rc" -eq 0 ]; then
            echo "ok - regressions/$t: $n inputs"
        else
            echo "not ok - regressions/$t: $n inputs, exit $rc (log $log)"
            grep -E 'ERROR|SUMMARY|Running:|^    #[0-9]+ ' "$log" | head -n 30 | sed 's/^/    /'
            fails=$((fails + 1))
        fi
    done
fi
[ "$fails" -eq 0 ]
