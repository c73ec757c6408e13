#!/bin/bash
# The main job on the embedded default: writes the tiny Step3-architecture model if it is
# missing and runs it. Once the cluster daemons are built, this starts a local cluster.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
BIN=$BUILD/bin
MODEL=${MODEL:-$BUILD/models/tiny-bf16}
[ -f "$MODEL/config.json" ] || "$BIN/afd_mkmodel" --out "$MODEL" --preset tiny --dtype bf16
echo "== afd_run: two prompts decoded together (greedy)"
"$BIN/afd_run" --model "$MODEL" --prompt 1,2,3,4 --prompt 17,42 --max-tokens 16 --ignore-eos
echo "== afd_run: sampled (temperature 0.8, top-p 0.9, seed 7)"
"$BIN/afd_run" --model "$MODEL" --prompt 1,2,3,4 --max-tokens 16 --temperature 0.8 --top-p 0.9 \
    --seed 7 --ignore-eos
