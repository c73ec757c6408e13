#!/bin/bash
# Decode throughput of the single-process runner (afd_run, one GEMM thread) on the mini
# model, for several batch sizes: the monolithic baseline the AFD pipeline is compared with.
#   BUILD       build directory (default build); the model lives in $BUILD/models/mini-bf16
#   BATCHES     batch sizes (default "1 4 16 32")
#   PROMPT_LEN  prompt tokens (default 32); MAX_TOKENS generated tokens (default 32)
# Each batch is B copies of one seeded random prompt. The whole batch is prefilled in one
# step (--prefill-chunk B*PROMPT_LEN), so every later step is a pure decode step at batch B:
# ms/step = decode_s / (steps - 1), checked against decode_tokens = (steps - 1) * B.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
BIN=$BUILD/bin
PY=/usr/bin/python3
MODEL=$BUILD/models/mini-bf16
BATCHES=${BATCHES:-"1 4 16 32"}
PROMPT_LEN=${PROMPT_LEN:-32}
MAX_TOKENS=${MAX_TOKENS:-32}

for b in afd_mkmodel afd_run; do
    [ -x "$BIN/$b" ] || { echo "decode_cpu: $BIN/$b is missing (run make)" >&2; exit 1; }
done

echo "machine: $(nproc) cores online ($(nproc --all) configured)"
if [ -x "$BIN/afd_gemm_bench" ]; then
    "$BIN/afd_gemm_bench" --info
else
    echo "OpenBLAS core: unknown ($BIN/afd_gemm_bench missing)"
fi

# the checkpoint is written last-file-last (index.json); a half-written one is redone
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
    echo "writing the mini model to $MODEL"
    mkdir -p "$(dirname "$MODEL")"
    rm -rf "$MODEL.tmp"
    "$BIN/afd_mkmodel" --out "$MODEL.tmp" --preset mini --dtype bf16
    rm -rf "$MODEL"
    mv "$MODEL.tmp" "$MODEL"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

vocab=$("$PY" -c '
import json, sys
c = json.load(open(sys.argv[1]))
print(c.get("text_config", c)["vocab_size"])' "$MODEL/config.json")
prompt=$("$PY" -c '
import random, sys
r = random.Random(20240611)
print(",".join(str(r.randrange(int(sys.argv[1]))) for _ in range(int(sys.argv[2]))))' \
    "$vocab" "$PROMPT_LEN")

echo "afd_run --threads 1, prompt $PROMPT_LEN random ids x B copies, $MAX_TOKENS tokens each" \
    "(--ignore-eos), kv bf16, a2f fp8, f2a bf16 (defaults)"
for B in $BATCHES; do
    chunk=$((B * PROMPT_LEN))
    [ "$chunk" -ge 512 ] || chunk=512
    if ! "$BIN/afd_run" --model "$MODEL" --prompt "$prompt" --repeat "$B" \
        --max-tokens "$MAX_TOKENS" --ignore-eos --threads 1 --prefill-chunk "$chunk" \
        --progress=false --json >"$tmp/run-$B.json" 2>"$tmp/run-$B.err"; then
        echo "decode_cpu: afd_run failed at batch $B:" >&2
        cat "$tmp/run-$B.err" >&2
        exit 1
    fi
done

"$PY" - "$tmp" $BATCHES <<'EOF'
import json, os, sys
d = sys.argv[1]
print("%5s %14s %12s %10s %10s %9s %7s" % ("batch", "decode tok/s", "ms/step", "load s",
                                          "prefill s", "decode s", "steps"))
warn = []
for b in sys.argv[2:]:
    t = json.load(open(os.path.join(d, "run-%s.json" % b)))["timing"]
    dsteps = int(t["steps"]) - 1  # the first step is the whole prefill
    if dsteps <= 0 or int(t["decode_tokens"]) != dsteps * int(t["batch"]):
        warn.append("batch %s: decode_tokens %d != (steps-1)*batch; ms/step is decode_s/steps"
                    % (b, t["decode_tokens"]))
        dsteps = int(t["steps"])
    print("%5d %14.1f %12.2f %10.2f %10.3f %9.3f %7d" % (
        t["batch"], t["decode_tokens_per_s"], 1e3 * t["decode_s"] / max(dsteps, 1),
        t["load_s"], t["prefill_s"], t["decode_s"], t["steps"]))
for w in warn:
    print("warning:", w)
EOF
