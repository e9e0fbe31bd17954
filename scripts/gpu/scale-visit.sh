#!/usr/bin/env bash
# Issue 25 at full scale on one GPU, random-weight checkpoints written there: Llama-3.1-8B f32
# parity at ~3k/~30k (contiguous and paged), a 128k-token prompt at the full cache and rates
# 2-64 with the memory plan, the peer's speed row, then KVC-full at 32k/128k, Mistral-7B's
# parity and speed row, the paged path at --prefill-chunk 8192, bf16 parity.
#   PART=A|B|C bash scripts/gpu/scale-visit.sh STAGE
# C: the 128k runs again (after the pool sizing fix) and the kernels' GPU tests and bench
# (STAGE/cuda_kernels, STAGE/kvc-kernel-bench). D: Llama bf16 parity, contiguous and paged.
# STAGE: kvc (CUDA build), llama3/tokenizer.model, mistral-7b-tokenizer/, longbench/multi_news.jsonl,
# whl/ (tiktoken, regex). Every step logs under $OUT/<step>.txt with its rc and wall time, and is
# skipped when a warm machine already holds its marker (/tmp/visit); the order is the priority
# (a device call ends at 10 minutes: what finished is already under $OUT).
set -uo pipefail
stage=$1
kvc=$stage/kvc
ck=/tmp/ckpt
mkdir -p "$ck"
source scripts/gpu/visit-lib.sh
ckpt() { python3 scripts/gpu/make_checkpoint.py "$@"; }
ref() {  # CKPT OUTDIR DTYPE
  python3 scripts/gpu/llama_reference.py "$1" "$stage/longbench/multi_news.jsonl" "$2" \
    --tokens 3000,30000 --dtype "$3"
}
conf() {  # CKPT REFDIR DTYPE(kvc) EXTRA...
  local dir=$1 refdir=$2 dt=$3; shift 3
  "$kvc" conformance --model "$dir" --device cuda:0 --dtype "$dt" \
    --reference "$refdir/reference-$dt.jsonl" --rederived "$refdir/rederived-$dt.jsonl" "$@"
}
ruler() {  # CKPT OUTDIR LENGTHS EXTRA...
  local dir=$1 o=$2 lens=$3; shift 3
  "$kvc" eval -m "$dir" --device cuda:0 --tasks ruler:niah_single_1 --lengths "$lens" \
    --ruler-samples 1 --no-progress --out "$o" "$@"
}
L=$ck/llama-3.1-8b M=$ck/mistral-7b
if [[ ${PART:-A} == A ]]; then
  step ckpt-llama ckpt llama-3.1-8b "$L" --tokenizer-model "$stage/llama3/tokenizer.model" || exit 1
  step ref-llama-f32 ref "$L" "$ck/ref-llama" float32
  cp "$ck"/ref-llama/*.jsonl "$out/" 2>/dev/null
  step conf-llama-f32-contiguous conf "$L" "$ck/ref-llama" f32
  step conf-llama-f32-paged conf "$L" "$ck/ref-llama" f32 --cache paged
  step eval-llama-128k ruler "$L" "$out/eval-128k" 128000 --rates 1,2,4,8,16,32,64
  step bench-llama-32k-chunk8192 "$kvc" bench-model -m "$L" --device cuda:0 --prompt-lens 4000,32000 \
    --prefill-chunk 8192 --decode-tokens 128 --repeats 1 --csv "$out/bench-llama.csv"
  step hf-speed-llama python3 scripts/gpu/hf_speed.py "$L" --prompt-lens 4000,32000 --repeats 1 \
    --csv "$out/hf-speed-llama.csv"
elif [[ $PART == C ]]; then
  step ckpt-llama ckpt llama-3.1-8b "$L" --tokenizer-model "$stage/llama3/tokenizer.model" || exit 1
  step eval-llama-128k ruler "$L" "$out/eval-128k" 128000 --rates 1,2,4,8,16,32,64
  step eval-kvc-full-128k ruler "$L" "$out/kvc-full-128k" 128000 --methods kvcompress --rates 8 \
    --kvc-window 1000000 --kvc-buffer 10 --max-pool 0 --compress-once
  step cuda-kernels "$stage/cuda_kernels" --test-threads=1 --nocapture
  step kernel-bench "$stage/kvc-kernel-bench" --csv "$out/kernel-bench.csv"
elif [[ $PART == D ]]; then
  step ckpt-llama ckpt llama-3.1-8b "$L" --tokenizer-model "$stage/llama3/tokenizer.model" || exit 1
  step ref-llama-bf16 ref "$L" "$ck/ref-llama" bfloat16
  cp "$ck"/ref-llama/*bf16.jsonl "$out/" 2>/dev/null
  # bf16 logits near 8-16 move in steps of 0.0625: a divergence within about one step is a tie.
  step conf-llama-bf16-contiguous conf "$L" "$ck/ref-llama" bf16 --logit-tol 0.25 --tie-margin 0.07
  step conf-llama-bf16-paged conf "$L" "$ck/ref-llama" bf16 --cache paged --logit-tol 0.25 --tie-margin 0.07
else
  step ckpt-llama ckpt llama-3.1-8b "$L" --tokenizer-model "$stage/llama3/tokenizer.model" || exit 1
  step eval-kvc-full ruler "$L" "$out/kvc-full" 32000,128000 --methods kvcompress --rates 8 \
    --kvc-window 1000000 --kvc-buffer 10 --max-pool 0 --compress-once
  step ckpt-mistral ckpt mistral-7b "$M" --tokenizer-dir "$stage/mistral-7b-tokenizer"
  step ref-mistral-f32 ref "$M" "$ck/ref-mistral" float32
  mkdir -p "$out/mistral" && cp "$ck"/ref-mistral/*.jsonl "$out/mistral/" 2>/dev/null
  step conf-mistral-f32-contiguous conf "$M" "$ck/ref-mistral" f32
  step conf-mistral-f32-paged conf "$M" "$ck/ref-mistral" f32 --cache paged
  step bench-mistral "$kvc" bench-model -m "$M" --device cuda:0 --prompt-lens 4000,32000 \
    --prefill-chunk 8192 --decode-tokens 128 --repeats 1 --csv "$out/bench-mistral.csv"
  step hf-speed-mistral python3 scripts/gpu/hf_speed.py "$M" --prompt-lens 4000,32000 --repeats 1 \
    --csv "$out/hf-speed-mistral.csv"
  step ref-llama-f32 ref "$L" "$ck/ref-llama" float32
  step conf-llama-f32-paged-chunk8192 conf "$L" "$ck/ref-llama" f32 --cache paged --prefill-chunk 8192
fi
cat "$out/gpu.txt"
for f in "$out"/*.txt; do echo "-- $(basename "$f"): $(tail -n 1 "$f")"; done
tail -n 5 "$out"/conf-*.txt 2>/dev/null
grep -h "memory plan\|warning" "$out"/eval-*.txt 2>/dev/null | head
