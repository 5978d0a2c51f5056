#!/usr/bin/env bash
# Installs what the build and tests need from Debian's archive (run as root).
# Idempotent: does nothing when everything is already there.
set -euo pipefail
PKGS=(build-essential cmake ninja-build pkg-config git libopenmpi-dev openmpi-bin
      libfabric-dev libfabric-bin libibverbs-dev rdma-core
      libgflags-dev libgoogle-glog-dev libgtest-dev libgmock-dev iproute2
      redis-server libhiredis-dev
      python3-dev python3-pybind11 pybind11-dev python3-numpy python3-pytest libdlpack-dev
      python3-pip python3-venv python3-setuptools clang-format)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
