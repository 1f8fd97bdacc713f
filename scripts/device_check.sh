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
    tests) ctest --test-dir build-gpu -L gpu -E "CudaModel" --output-on-failure --timeout 600 2>&1 | tee "$out/ctest_gpu.log" | tail -8
           # Run directly so that the figures it prints are kept whether it passes or not.
           timeout 280 ./build-gpu/tests/test_cuda_model 2>&1 | tee "$out/model.log" | grep -E "info|OK|FAILED|Failure" ;;
    decoder) timeout 400 ./build-gpu/tests/test_cuda_decoder 2>&1 | tee "$out/decoder.log" | grep -E "info|OK|FAILED|Failure|Expected|Which|actual" | head -60
             for run in "1 masks,low-res" "1 rle" "64 masks,low-res" "64 rle" "64 masks"; do
               set -- $run
               ./build-gpu/apps/segany bench --arch vit_h --device cuda --decoder --prompts "$1" --outputs "$2" --profile \
                 2>&1 | tee -a "$out/bench_decoder.jsonl"
             done ;;
    unit) ctest --test-dir build-gpu -LE "gpu|slow" -j"$jobs" --output-on-failure 2>&1 | tail -15 ;;
    bench) for run in "vit_b 1" "vit_b 8" "vit_b 32" "vit_l 8" "vit_h 1" "vit_h 8" "vit_h 32"; do
             set -- $run
             ./build-gpu/apps/segany bench --arch "$1" --device cuda --batch "$2" --profile 2>&1 | tee -a "$out/bench.jsonl"
           done ;;
    # Segment everything, vit_h (random weights), 32x32 grid, no crops, thresholds 0: a folder of
    # copies of each test image, read, decoded, segmented and written as COCO RLE JSON.
    everything) for run in "vit_h truck 0 64" "vit_h truck 0 256" "vit_h truck 1 64" "vit_h dog 0 64" "vit_b truck 0 64"; do
                  set -- $run
                  ckpt=/tmp/segany_$1.safetensors
                  [ -f "$ckpt" ] || ./build-gpu/apps/segany init --arch "$1" "$ckpt" >/dev/null
                  rm -rf /tmp/amg_in /tmp/amg_out && mkdir -p /tmp/amg_in
                  for i in $(seq 1 12); do cp "$shared/images/$2.jpg" "/tmp/amg_in/$2_$i.jpg"; done
                  echo "everything $run (arch, image, crop layers, points per batch)" | tee -a "$out/everything.log"
                  ./build-gpu/apps/segany everything "$ckpt" /tmp/amg_in --device cuda --points-per-side 32 \
                    --pred-iou-thresh 0 --stability-score-thresh 0 --crop-n-layers "$3" --points-per-batch "$4" \
                    --out /tmp/amg_out 2>&1 |
                    tail -3 | tee -a "$out/everything.log"
                done ;;
    *) echo "unknown step $step (tests, decoder, unit, bench, everything)"; exit 2 ;;
  esac
done
