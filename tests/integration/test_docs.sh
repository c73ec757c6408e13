#!/bin/bash
# docs/configuration.md is what the binaries' --help says (regenerate it with
# scripts/gen_config_doc.sh after changing an option).
set -u
cd "$ROOT"
tmp=$(mktemp)
BUILD=$BUILD scripts/gen_config_doc.sh "$tmp"
if diff -u docs/configuration.md "$tmp" >/dev/null; then
    echo "ok - docs/configuration.md matches every binary's --help"
else
    echo "not ok - docs/configuration.md differs from the binaries' --help (run scripts/gen_config_doc.sh)"
    diff -u docs/configuration.md "$tmp" | head -20
fi
rm -f "$tmp"
