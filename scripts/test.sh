#!/usr/bin/env bash
# Builds everything with warnings as errors and runs every test but the slow ones; CI runs this
# (.ci/run). GPU tests skip themselves where there is no GPU. The CUDA backend is built wherever
# nvcc is found, so that CI compiles it even on machines without a GPU and it cannot rot.
#   usage: scripts/test.sh          env: SEGANY_BUILD_DIR (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${SEGANY_BUILD_DIR:-build}

scripts/setup.sh

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if command -v nvcc >/dev/null 2>&1; then cuda=ON; else cuda=OFF; fi
echo "test.sh: building in $build/ (Release, warnings as errors, CUDA backend $cuda)"

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEGANY_WERROR=ON -DSEGANY_CUDA=$cuda
cmake --build "$build" -j"$(nproc)"

# Tests run in parallel; two OpenMP threads each keep the threaded code paths exercised without
# oversubscribing the machine nproc-fold.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" -LE slow
