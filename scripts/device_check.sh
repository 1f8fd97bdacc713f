#!/usr/bin/env bash
# Builds segany with CUDA on a GPU machine, runs the GPU tests and the encoder benchmarks, and
# leaves logs in $OUT (or ./out). Golden data is read from $SEGANY_SHARED_DIR (default ../shared,
# else .device/shared, a git-ignored copy for machines where ../shared does not exist).
set -uo pipefail
# Our OpenMP threads must yield when idle: the BLAS there may run its own thread pool.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
shared=${SEGANY_SHARED_DIR:-../shared}
[ -d "$shared/golden" ] || shared=$PWD/.device/shared
jobs=$(nproc)
arch=${SEGANY_CUDA_ARCH:-90a}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEGANY_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DSEGANY_SHARED_DIR="$shared" >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j"$jobs" >"$out/build.log" 2>&1 || { grep -E "error|Error" -A5 "$out/build.log" | head -60; exit 1; }
echo "build ok"
for step in "$@"; do
  case "$step" in
    tests) ctest --test-dir build-gpu -L gpu --output-on-failure --timeout 900 2>&1 | tee "$out/ctest_gpu.log" | tail -40 ;;
    unit) ctest --test-dir build-gpu -LE "gpu|slow" -j"$jobs" --output-on-failure 2>&1 | tail -15 ;;
    bench) for a in vit_b vit_l vit_h; do for b in 1 8 32; do
             ./build-gpu/apps/segany bench --arch "$a" --device cuda --batch "$b" --profile 2>&1 | tee -a "$out/bench.jsonl"
           done; done ;;
    *) echo "unknown step $step (tests, unit, bench)"; exit 2 ;;
  esac
done
