#!/bin/sh
# Installs the Debian packages the build, the daemons and the tests need.
# Idempotent and quiet when everything is there already.
set -e
PKGS="build-essential pkg-config libucx-dev ucx-utils libuv1-dev libprotobuf-c-dev
protobuf-c-compiler libcjson-dev libopenblas-dev libpcre2-dev libcmocka-dev node-llhttp
python3 python3-numpy prometheus"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps: installing$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
