#!/usr/bin/env bash
# lime's CUDA path on a machine with an NVIDIA GPU (a Jetson, or a data-centre GPU
# for development). Builds with `--features cuda`, runs the GPU tests (lime's own
# kernels against their CPU twins, GPU against CPU within tolerance with greedy
# tokens alike, split-equals-whole on the GPU, streamed slots against resident
# layers, a cluster of GPU stage processes against one GPU process), then the
# device benchmark: batch-1 decode against the memory-bandwidth
# roofline, and with half the layers streamed from storage, its loading bubbles.
#
# Needs: the CUDA toolkit (nvcc, for candle's kernels), the driver, and Rust.
# Usage: field-tests/gpu.sh [results-dir]   (default field-tests/results/gpu-<host>)
# Environment: LIME_TEST_GPU (default cuda:0), CUDA_COMPUTE_CAP (default: asked of
# nvidia-smi), LIME_GPU_BENCH_DTYPE (default bf16), LIME_GPU_BENCH_STEPS (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-field-tests/results/gpu-$(hostname -s)}
mkdir -p "$out"
gpu=${LIME_TEST_GPU:-cuda:0}

command -v nvcc >/dev/null || {
  echo "field-tests/gpu.sh: nvcc not found; install the CUDA toolkit and put its bin/ on PATH" >&2
  exit 1
}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$out/gpu.csv"
  : "${CUDA_COMPUTE_CAP:=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
fi
export CUDA_COMPUTE_CAP LIME_TEST_GPU=$gpu
echo "field-tests/gpu.sh: building for compute capability ${CUDA_COMPUTE_CAP:-unset} on $gpu" >&2

step() { echo; echo "== $*" >&2; }

step "building lime with the cuda feature"
cargo build --release --features cuda --workspace --bins 2>&1 | tee "$out/build.log" | tail -3

step "lime's kernels against their CPU twins (NVRTC compile included)"
cargo test --release --features cuda -p lime-kernels --lib cuda:: 2>&1 | tee "$out/kernels.log"

step "GPU against CPU, split-equals-whole and streamed slots on the GPU"
cargo test --release --features cuda -p lime-kernels --test gpu -- --test-threads=1 2>&1 | tee "$out/gpu-tests.log"

step "lime-stage processes on the GPU answer as one GPU process, bit for bit (partitions, bf16/f32, streamed layers)"
cargo test --release --features cuda -p lime-testbench --test gpu_cluster -- --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-cluster.log"

step "the CPU suite of the kernels still passes in the cuda build"
cargo test --release --features cuda -p lime-kernels --test split_equals_whole --test slots --test batching 2>&1 \
  | tee "$out/cpu-tests.log" | grep -E "^test result"

dtype=${LIME_GPU_BENCH_DTYPE:-bf16}
step "device benchmark on $gpu ($dtype): decode vs roofline, then half the layers streamed"
./target/release/lime bench device --device "$gpu" --dtype "$dtype" --model "models/bench-$dtype" \
  --steps "${LIME_GPU_BENCH_STEPS:-64}" --json | tee "$out/bench-device.txt"

step "the same benchmark on the CPU of this machine, side by side"
./target/release/lime bench device --device cpu --dtype "$dtype" --model "models/bench-$dtype" \
  --steps 8 --json | tee "$out/bench-device-cpu.txt"

echo
echo "field-tests/gpu.sh: results in $out" >&2
