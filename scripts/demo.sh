#!/bin/bash
# The main job on the embedded default: writes the tiny Step3-architecture model if it is
# missing, starts a local 1A2F cluster (one attention node, two FFN nodes, the coordinator)
# on loopback, sends a few completions (one streamed), prints them and a short
# decode-throughput figure, and stops the cluster.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
BIN=$BUILD/bin
MODEL=${MODEL:-$BUILD/models/tiny-bf16}
PORT=${PORT:-8000}
[ -f "$MODEL/model.safetensors.index.json" ] && [ -f "$MODEL/tokenizer.json" ] || "$BIN/afd_mkmodel" --out "$MODEL" --preset tiny --dtype bf16 --force
LOGS=$(mktemp -d)
echo "== starting a 1A2F cluster on loopback (logs in $LOGS)"
"$BIN/afdctl" local-up --model "$MODEL" --attn 1 --ffn 2 --port "$PORT" --log-dir "$LOGS" >"$LOGS/afdctl.out" &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    grep -q '^ready:' "$LOGS/afdctl.out" 2>/dev/null && break
    kill -0 $UP 2>/dev/null || { echo "the cluster failed to start:"; tail -n 20 "$LOGS"/*.log; exit 1; }
    sleep 0.1
done
grep '^ready:' "$LOGS/afdctl.out"
"$BIN/afdctl" status --url "http://127.0.0.1:$((PORT + 1))"
/usr/bin/python3 scripts/demo_client.py "http://127.0.0.1:$PORT"
sleep 1.2 # one more heartbeat, so the nodes' busy times include the work above
"$BIN/afdctl" status --url "http://127.0.0.1:$((PORT + 1))"
