#!/bin/bash
# Writes docs/configuration.md from the daemons' own --help (their options tables), so
# the documentation cannot drift from the binaries; tests/integration/test_docs.sh checks it.
#   BUILD=build scripts/gen_config_doc.sh [OUT]
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
OUT=${1:-docs/configuration.md}
{
    echo "# Configuration"
    echo
    echo "Every daemon reads its options, in increasing priority, from the defaults, a file"
    echo "given by \`--config FILE\` (lines \`name = value\`, \`#\` comments), the environment"
    echo "(\`AFD_NAME\`: the option's name in upper case, dashes as underscores, e.g."
    echo "\`AFD_CLUSTER_TOKEN\`) and the command line (\`--name value\` or \`--name=value\`)."
    echo "\`--print-config\` prints the effective values (secrets hidden). This page is"
    echo "generated from the binaries' \`--help\` by \`scripts/gen_config_doc.sh\`."
    for b in afd_coordinator attn_node ffn_node afd_run afd_mkmodel; do
        echo
        echo "## $b"
        echo
        echo '```'
        "$BUILD/bin/$b" --help
        echo '```'
    done
    echo
    echo "## afdctl"
    echo
    echo '```'
    "$BUILD/bin/afdctl" --help
    echo
    "$BUILD/bin/afdctl" local-up --help
    echo '```'
} >"$OUT"
