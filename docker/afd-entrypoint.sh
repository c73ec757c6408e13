#!/bin/sh
# afd-entrypoint: starts one AFD daemon in a container (installed as
# /usr/local/bin/afd-entrypoint; the Kubernetes manifests use it as the command).
#   afd-entrypoint DAEMON [ARGS...]     DAEMON: afd_coordinator, attn_node, ffn_node, ...
# It refuses to start while a secret still holds the manifests' placeholder value
# (AFD_CLUSTER_TOKEN, AFD_ADMIN_TOKEN, AFD_API_KEY, or the --api-keys-file contents), so
# that a cluster never runs on the published placeholders; then the daemon replaces it.
# (Nodes wait for the coordinator themselves: their --coordinator-wait-s.)
set -u
if [ $# -lt 1 ]; then
    echo "usage: afd-entrypoint DAEMON [ARGS...]" >&2
    exit 2
fi
placeholder=REPLACE-ME
for v in "${AFD_CLUSTER_TOKEN:-}" "${AFD_ADMIN_TOKEN:-}" "${AFD_API_KEY:-}"; do
    case "$v" in
    *"$placeholder"*)
        echo "afd-entrypoint: a secret still holds its placeholder value: replace the afd-secrets Secret (docs/kubernetes.md)" >&2
        exit 2
        ;;
    esac
done
# the API keys file, whether given as a flag or in a --config file
keys=""
prev=""
for a in "$@"; do
    case "$a" in
    --api-keys-file=*) keys=${a#--api-keys-file=} ;;
    esac
    [ "$prev" = "--api-keys-file" ] && keys=$a
    if [ "$prev" = "--config" ] && [ -r "$a" ]; then
        k=$(sed -n 's/^[[:space:]]*api-keys-file[[:space:]]*=[[:space:]]*//p' "$a" | tail -n 1)
        [ -n "$k" ] && keys=$k
    fi
    prev=$a
done
if [ -n "$keys" ] && [ -r "$keys" ] && grep -q "$placeholder" "$keys"; then
    echo "afd-entrypoint: $keys still holds the placeholder API key: replace the afd-secrets Secret (docs/kubernetes.md)" >&2
    exit 2
fi
exec "$@"
