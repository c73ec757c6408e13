#!/bin/bash
# Downloads (does not install) the Debian packages that building the CUDA checks needs
# beyond a CUDA toolkit, into DIR (default build/cuda-deps), for a
# GPU machine whose image has CUDA but not this project's libraries: run.sh unpacks
# them into a private prefix there. Needs apt-get; run it where the packages resolve.
set -eu
cd "$(dirname "$0")/../.."
dir=${1:-${AFD_CUDA_DEPS:-build/cuda-deps}}
mkdir -p "$dir"
pkgs="libucx-dev libucx0 libnuma1 libibverbs1 librdmacm1 libuv1-dev libuv1
libprotobuf-c-dev libprotobuf-c1 protobuf-c-compiler libprotoc32 libprotobuf32
libcjson-dev libcjson1 libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread
libopenblas0 libgfortran5 libpcre2-dev libpcre2-8-0 libcmocka-dev libcmocka0 node-llhttp"
# shellcheck disable=SC2086
(cd "$dir" && apt-get download $pkgs >/dev/null)
echo "prepare_deps: $(ls "$dir"/*.deb | wc -l) packages, $(du -sh "$dir" | cut -f1) in $dir"
