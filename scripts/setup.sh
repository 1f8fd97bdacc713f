#!/usr/bin/env bash
# Installs what segany needs to build and test, on Debian 12 or Ubuntu 24.04 (apt). Only missing
# packages are installed, so a second run is silent and instant. The CUDA toolkit is not installed
# here: the CUDA backend is built where nvcc already is (see scripts/test.sh).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config  # compiler and build tools
  libopenblas-openmp-dev                        # CPU GEMMs (the OpenMP build: one thread pool with ours)
  libjpeg-dev libpng-dev zlib1g-dev             # image files
  nlohmann-json3-dev libcli11-dev               # JSON, the command line
  libgtest-dev googletest                       # tests
  curl ca-certificates                          # scripts/quickstart.sh downloads the checkpoint
)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# Where installing is impossible (no apt, no root, no network) we say so and go on: a machine may
# have the libraries from elsewhere, and the build names anything really missing.
warn() {
  echo "setup.sh: warning: $1; not installed: ${missing[*]}" >&2
  echo "setup.sh: continuing: the build will stop with a clear message if one of them is really needed" >&2
  exit 0
}
command -v apt-get >/dev/null 2>&1 || warn "apt-get not found (not Debian/Ubuntu?)"
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  warn "not root and no sudo"
fi

echo "setup.sh: installing ${missing[*]}"
apt() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq "$@"; }
apt update || warn "apt-get update failed (no network?)"
apt install -y --no-install-recommends "${missing[@]}" >/dev/null || warn "apt-get install failed"
echo "setup.sh: done"
