#!/usr/bin/env bash
# README command 1: install what is missing, build, and run the main job:
# te-bench between two processes over libfabric tcp on loopback, data
# verified, the same cases with a bare libfabric loop as the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target te-bench
exec ./build/tools/te-bench --loopback --raw "$@"
