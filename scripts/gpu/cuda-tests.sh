#!/usr/bin/env bash
# CUDA kernel tests and kernel benchmark (issue 6) for the GPU machine.
#
# 1. Here (no GPU): build the test executable and the bench, strip, copy to target/gpu-stage/:
#      bash scripts/gpu/cuda-tests.sh build
#    (uses CARGO_TARGET_DIR if set; needs the CUDA toolchain: it runs scripts/cuda-toolchain.sh)
#    then stage: ../shared/gpu/stage.sh target/gpu-stage scripts/gpu/cuda-tests.sh
# 2. There (after unpack.sh put them under /tmp/kvc/):
#      bash /tmp/kvc/scripts/gpu/cuda-tests.sh run /tmp/kvc/target/gpu-stage
#    Writes logs under $OUT (default ./gpu-out) and prints the summary last:
#    kernel-vs-twin lines (max errors per case), e2e greedy agreement, the bench table.
# Both binaries link libcuda.so.1 dynamically (as candle does) and need no other files.
set -uo pipefail
cmd=${1:-}
case "$cmd" in
build)
  set -e
  top=$(git rev-parse --show-toplevel); cd "$top"
  eval "$(scripts/cuda-toolchain.sh)"
  tdir=${CARGO_TARGET_DIR:-target}
  cargo build --release --features cuda --bin kvc-kernel-bench
  # The test executable's path is printed by cargo ("Executable tests/cuda_kernels.rs (PATH)").
  exe=$(cargo test --release --features cuda --test cuda_kernels --no-run 2>&1 \
        | sed -n 's/.*Executable tests\/cuda_kernels.rs (\(.*\))/\1/p' | tail -1)
  [[ -n $exe && -x $exe ]] || { echo "could not find the cuda_kernels test executable" >&2; exit 1; }
  mkdir -p target/gpu-stage
  strip -o target/gpu-stage/cuda_kernels "$exe"
  strip -o target/gpu-stage/kvc-kernel-bench "$tdir/release/kvc-kernel-bench"
  ls -la target/gpu-stage
  echo "stage with: ../shared/gpu/stage.sh target/gpu-stage scripts/gpu/cuda-tests.sh"
  ;;
run)
  dir=${2:?usage: cuda-tests.sh run DIR_WITH_BINARIES}
  out=${OUT:-gpu-out}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader > "$out/gpu.txt" 2>&1
  # Tests: one thread (they share the GPU), output shown (each case prints its errors).
  "$dir/cuda_kernels" --test-threads=1 --nocapture > "$out/cuda-tests.txt" 2>&1
  echo "cuda_kernels rc=$?" >> "$out/rc.txt"
  "$dir/kvc-kernel-bench" --csv "$out/kernel-bench.csv" > "$out/kernel-bench.txt" 2> "$out/kernel-bench.err"
  echo "kernel-bench rc=$?" >> "$out/rc.txt"
  # A G=3, head dim 64 row (SmolLM2-shaped groups) and a long-context small-batch split-K row.
  "$dir/kvc-kernel-bench" --batch 64 --ctx 4096 --head-dim 64 --kv-heads 3 --q-heads 9 \
    --iters 30 > "$out/kernel-bench-smollm2.txt" 2>> "$out/kernel-bench.err"
  echo "kernel-bench smollm2-shape rc=$?" >> "$out/rc.txt"
  "$dir/kvc-kernel-bench" --batch 2 --ctx 32768 --iters 30 --parts 0,auto,4096,2048,1024 \
    > "$out/kernel-bench-long.txt" 2>> "$out/kernel-bench.err"
  echo "kernel-bench long rc=$?" >> "$out/rc.txt"
  cat "$out/gpu.txt" "$out/rc.txt"
  grep -E "^test |test result|SUMMARY|panicked|out of tolerance" "$out/cuda-tests.txt" | tail -n 30
  cat "$out/kernel-bench.txt" "$out/kernel-bench-smollm2.txt" "$out/kernel-bench-long.txt"
  ;;
*)
  sed -n 2,14p "$0"; exit 2 ;;
esac
