#!/bin/bash
# xfer_bench: net_ucx_send bandwidth (afd_xfer_bench) next to ucx_perftest -t ucp_am_bw
# (UCP active-message bandwidth, the same UCX API underneath) at the same message sizes,
# window of outstanding sends, iteration counts and transports; both tools run
# server/receiver and client/sender as two processes on this host.
#   shm: the default transports (UCX_TLS unset: sysv/posix shared memory + cma)
#   tcp: UCX_TLS=tcp UCX_NET_DEVICES=lo
# Each (size, transport) point runs REPEAT times, ours and perftest interleaved so that
# both see the same machine load; the table shows the best run of each (MB = 2^20 bytes,
# as ucx_perftest prints) and ours / perftest.
#   BUILD=build bench/xfer_bench.sh
#   env: SIZES="65536 262144 1048576 4194304" TRANSPORTS="shm tcp" REPEAT=3 BYTES=512M
#        WINDOW=32 (ucp_am_bw's default window) WARMUP=50 MIN_ITERS=200
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
BIN=$BUILD/bin/afd_xfer_bench
SIZES=${SIZES:-"65536 262144 1048576 4194304"}
TRANSPORTS=${TRANSPORTS:-"shm tcp"}
REPEAT=${REPEAT:-3}
BYTES=${BYTES:-512M}
WINDOW=${WINDOW:-32}
WARMUP=${WARMUP:-50}
MIN_ITERS=${MIN_ITERS:-200}
PORT=${PORT:-$((20000 + RANDOM % 20000))}

[ -x "$BIN" ] || { echo "xfer_bench: $BIN missing (run make)" >&2; exit 1; }
command -v ucx_perftest >/dev/null || { echo "xfer_bench: ucx_perftest missing (ucx-utils)" >&2; exit 1; }

case $BYTES in
*K) bytes=$((${BYTES%K} << 10)) ;;
*M) bytes=$((${BYTES%M} << 20)) ;;
*G) bytes=$((${BYTES%G} << 30)) ;;
*) bytes=$BYTES ;;
esac

set_transport() {
    unset UCX_TLS UCX_NET_DEVICES
    case $1 in
    shm) ;;
    tcp) export UCX_TLS=tcp UCX_NET_DEVICES=lo ;;
    *) echo "xfer_bench: unknown transport $1" >&2; exit 1 ;;
    esac
}

iters_for() { # size -> iterations (the rule afd_xfer_bench applies)
    local n=$((bytes / $1))
    [ "$n" -lt "$MIN_ITERS" ] && n=$MIN_ITERS
    echo "$n"
}

ours() { # size -> MB/s
    "$BIN" --sizes "$1" --window "$WINDOW" --bytes "$bytes" --warmup "$WARMUP" \
        --min-iters "$MIN_ITERS" 2>/dev/null | awk '!/^#/ && NF == 4 {v = $4} END {print v + 0}'
}

perftest() { # size -> MB/s (ucp_am_bw, overall bandwidth of the client)
    local s=$1 n port out srv try
    n=$(iters_for "$s")
    port=$PORT
    PORT=$((PORT + 1))
    local args=(-t ucp_am_bw -s "$s" -n "$n" -w "$WARMUP" -O "$WINDOW" -p "$port")
    timeout 120 ucx_perftest "${args[@]}" >/dev/null 2>&1 &
    srv=$!
    out=
    for try in $(seq 1 50); do
        sleep 0.1
        out=$(timeout 120 ucx_perftest 127.0.0.1 "${args[@]}" -f 2>/dev/null) && break
        out=
    done
    [ -z "$out" ] && kill "$srv" 2>/dev/null
    wait "$srv" 2>/dev/null
    echo "$out" | awk 'NF == 8 && $1 ~ /^[0-9]+$/ {v = $6} END {print v + 0}'
}

best() { printf '%s\n' "$@" | sort -g | tail -n 1; }

echo "# ours: $BIN (net_ucx_send, registered buffers, window $WINDOW)"
echo "# perftest: ucx_perftest -t ucp_am_bw -O $WINDOW -w $WARMUP (same sizes and iterations)"
echo "# best of $REPEAT runs each, interleaved; MB/s with MB = 2^20 bytes"
printf '%-10s %-10s %12s %16s %8s\n' size transport "ours MB/s" "perftest MB/s" ratio
for tr in $TRANSPORTS; do
    set_transport "$tr"
    for s in $SIZES; do
        o=() p=()
        for r in $(seq 1 "$REPEAT"); do
            o+=("$(ours "$s")")
            p+=("$(perftest "$s")")
        done
        bo=$(best "${o[@]}")
        bp=$(best "${p[@]}")
        ratio=$(awk -v a="$bo" -v b="$bp" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}')
        printf '%-10s %-10s %12.1f %16.1f %8s\n' "$s" "$tr" "$bo" "$bp" "$ratio"
    done
done
