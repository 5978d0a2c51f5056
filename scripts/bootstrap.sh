#!/usr/bin/env bash
# README command 1: install what is missing, build, set up the Python package,
# and run the main job: te-bench between two processes over libfabric tcp on
# loopback, data verified, the same cases with a bare libfabric loop as the
# baseline.
#
# The Python package goes into .venv, a virtual environment made from
# Debian's /usr/bin/python3 with its system packages (numpy, pytest):
#   .venv/bin/python -c "import transfer_engine"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target te-bench _transfer_engine
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# Offline: no index, no build isolation (setuptools and pybind11 are Debian's);
# reuses the build above, so this only links the module.
TE_CMAKE_BUILD_DIR=build .venv/bin/pip install -q --no-build-isolation --no-index .
.venv/bin/python -c "import transfer_engine as te; print('python: transfer_engine', te.__file__)"
exec ./build/tools/te-bench --loopback --raw "$@"
