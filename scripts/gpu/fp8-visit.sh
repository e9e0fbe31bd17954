#!/usr/bin/env bash
# FP8 weights on one GPU (issue 29): the GPU tests (fp8_linear_matches_twin and the one-rank
# NCCL compression test among them), then Llama-3.1-8B's exact shape in FP8 (random weights,
# per-row scales as Meta's FP8 checkpoints, written here) through `kvc bench-model` with
# --fp8 matmul and --fp8 dequantize (prefill and batch-1 decode speed, the GPU memory after
# load), and `kvc generate`'s first ids under both.
#   bash scripts/gpu/fp8-visit.sh STAGE
# STAGE: kvc and cuda_kernels (CUDA builds), llama3-tok/ (tokenizer.json, tokenizer_config.json
# and tokenizer.model of a Llama-3.1 checkpoint make_checkpoint.py wrote). Steps as in
# visit-lib.sh: logged under $OUT/<step>.txt, skipped on a warm machine that finished them.
set -uo pipefail
stage=$1
kvc=$stage/kvc
ck=/tmp/ckpt/llama-3.1-8b-fp8
source scripts/gpu/visit-lib.sh
export KVC_NCCL_LIB=${KVC_NCCL_LIB:-/usr/lib/x86_64-linux-gnu/libnccl.so.2}
step cuda-tests timeout 240 "$stage/cuda_kernels" --test-threads=1
step ckpt python3 scripts/gpu/make_checkpoint.py llama-3.1-8b "$ck" --fp8 row \
  --tokenizer-dir "$stage/llama3-tok" || exit 1
prompt="Summarize the following. $(printf 'The quick brown fox jumps over the lazy dog. %.0s' $(seq 60))"
bench() {  # MODE
  "$kvc" bench-model -m "$ck" --device cuda:0 --fp8 "$1" --prompt-lens 4000,32000 \
    --prefill-chunk 8192 --decode-tokens 64 --repeats 1
}
gen() {  # MODE
  "$kvc" generate -m "$ck" --device cuda:0 --fp8 "$1" --max-new-tokens 16 --json -p "$prompt"
}
step bench-matmul bench matmul
step bench-dequantize bench dequantize
step generate-matmul gen matmul
step generate-dequantize gen dequantize
