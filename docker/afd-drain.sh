#!/bin/sh
# afd-drain: the AFD pods' lifecycle hooks (installed as /usr/local/bin/afd-drain; the
# Kubernetes manifests call it as preStop hooks; operators may run it too). It talks to the
# coordinator's admin API with afdctl (AFD_ADMIN_URL, AFD_ADMIN_TOKEN).
#   afd-drain cluster      stop admitting requests (afdctl drain --all --timeout T) and
#                          wait until none is running or waiting
#   afd-drain node [NAME]  drain the attention node NAME (default: $AFD_NAME, the pod
#                          name): it takes no new sequences, finishes its own and leaves
#                          the data plane; wait until it has
#   afd-drain undrain      admit requests again
# T is AFD_DRAIN_TIMEOUT_S (default 30): the coordinator ends what is still running
# after T seconds, and the waits give up a little later. A hook never blocks a pod's
# shutdown for good: when the coordinator cannot be reached it returns at once.
set -u
timeout_s=${AFD_DRAIN_TIMEOUT_S:-30}
limit=$((timeout_s + 10))
log() { echo "afd-drain: $*" >&2; }

# prints "RUNNING WAITING" from afdctl status, nothing when unreachable
in_flight() {
    afdctl status 2>/dev/null | awk '/^requests:/ { gsub(",", ""); print $2, $4; exit }'
}

# prints the id and the state of the node called $1, nothing when it is not a member
node_row() {
    afdctl nodes 2>/dev/null | awk -v n="$1" 'NR > 1 && $4 == n { print $1, $5; exit }'
}

case "${1:-}" in
cluster)
    afdctl drain --all --timeout "$timeout_s" >/dev/null || {
        log "the coordinator did not take the drain"
        exit 0
    }
    t=0
    while [ "$t" -lt "$limit" ]; do
        # shellcheck disable=SC2046 # split into fields on purpose
        set -- $(in_flight)
        [ $# -lt 2 ] && exit 0
        [ "$1" -eq 0 ] && [ "$2" -eq 0 ] && exit 0
        sleep 1
        t=$((t + 1))
    done
    log "requests still in flight after ${limit}s"
    ;;
node)
    name=${2:-${AFD_NAME:-}}
    [ -n "$name" ] || {
        log "no node name (AFD_NAME)"
        exit 0
    }
    # shellcheck disable=SC2046 # split into fields on purpose
    set -- $(node_row "$name")
    [ $# -lt 2 ] && exit 0 # not a member: nothing to drain
    id=$1
    afdctl drain "$id" >/dev/null || {
        log "the coordinator did not take the drain of node $id"
        exit 0
    }
    t=0
    while [ "$t" -lt "$limit" ]; do
        # shellcheck disable=SC2046 # split into fields on purpose
        set -- $(node_row "$name")
        [ $# -lt 2 ] && exit 0
        [ "$2" = drained ] && exit 0
        sleep 1
        t=$((t + 1))
    done
    log "node $name ($id) not drained after ${limit}s"
    ;;
undrain)
    afdctl drain --undrain >/dev/null 2>&1 || log "the coordinator did not take the undrain"
    ;;
*)
    echo "usage: afd-drain cluster | node [NAME] | undrain" >&2
    exit 2
    ;;
esac
exit 0
