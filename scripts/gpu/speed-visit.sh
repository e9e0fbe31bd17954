#!/usr/bin/env bash
# Issue 26 (Llama-3.1-8B speed) on one GPU: the flash prefill kernel's GPU tests and its bench
# rows, then kvc's prefill and batch-1 decode at the 8B shape through the paged cache (the
# default on a GPU since generate / bench-model share eval's kernels) and the contiguous one,
# transformers' row on the same checkpoint in the same lease, and a 128k RULER prompt with
# KVC_PROFILE. Random weights (scripts/gpu/make_checkpoint.py): speed only.
#   bash scripts/gpu/speed-visit.sh STAGE
# STAGE: kvc, cuda_kernels, kvc-kernel-bench (CUDA builds), llama3/tokenizer.model, whl/
# (tiktoken, regex wheels). Every step logs under $OUT/<step>.txt with its rc and wall time and is
# skipped when a warm machine already holds its marker (/tmp/visit); the order is the priority
# (a device call ends at 10 minutes: what finished is already under $OUT).
set -uo pipefail
stage=$1
kvc=$stage/kvc
ck=/tmp/ckpt
mkdir -p "$ck"
source scripts/gpu/visit-lib.sh
L=$ck/llama-3.1-8b
bm() {  # CACHE CHUNK: kvc bench-model at 4k and 32k
  "$kvc" bench-model -m "$L" --device cuda:0 --cache "$1" --prompt-lens 4000,32000 \
    --prefill-chunk "$2" --decode-tokens 128 --repeats 2 --csv "$out/bench-$1-$2.csv"
}
step flash-tests "$stage/cuda_kernels" --test-threads=1 --nocapture prefill_flash paged_flash_prefill
step kernel-bench-prefill "$stage/kvc-kernel-bench" --only prefill --csv "$out/kernel-bench-prefill.csv"
step ckpt-llama python3 scripts/gpu/make_checkpoint.py llama-3.1-8b "$L" \
  --tokenizer-model "$stage/llama3/tokenizer.model" || exit 1
step bench-paged-8192 bm paged 8192
step hf-speed python3 scripts/gpu/hf_speed.py "$L" --prompt-lens 4000,32000 --repeats 2 \
  --csv "$out/hf-speed.csv"
step bench-paged-1024 bm paged 1024
step bench-contiguous-8192 bm contiguous 8192
step eval-128k env KVC_PROFILE=1 "$kvc" eval -m "$L" --device cuda:0 --tasks ruler:niah_single_1 \
  --lengths 128000 --ruler-samples 1 --no-progress --rates 1,64 --out "$out/eval-128k"
step cuda-tests-all "$stage/cuda_kernels" --test-threads=1
cat "$out/gpu.txt"
for f in "$out"/*.txt; do echo "-- $(basename "$f"): $(tail -n 1 "$f")"; done
grep -h "prefill" "$out/kernel-bench-prefill.txt" 2>/dev/null
cat "$out"/bench-*.txt "$out/hf-speed.txt" 2>/dev/null | grep -v "^rc=" | tail -n 30
