#!/usr/bin/env bash
# FP8 weights on one GPU (issue 29): the GPU tests (fp8_linear_matches_twin and the one-rank
# NCCL compression test among them; SKIP_TESTS=1 skips them), then a random-weight checkpoint
# of ARCH's exact shape in FP8 (per-row scales as Meta's FP8 checkpoints, written here; LAYERS
# cuts the depth: the 70B's 80 layers are ~70 GB, past a device machine's 64 GiB disk, 40
# fit) through `kvc bench-model` with --fp8 matmul and --fp8 dequantize (prefill and batch-1
# decode speed, the GPU memory after load), `kvc generate`'s first ids under both, and with
# EVAL=1 a RULER niah prompt of 32k at the full cache and KV-Compress 2/8/64x.
# MODES: the --fp8 modes to measure ("matmul dequantize"; dequantizing 35 GB of FP8 on the
# host takes minutes: MODES=matmul for the 70B shape).
#   [ARCH=llama-3.1-70b LAYERS=40 SKIP_TESTS=1 EVAL=1 MODES=matmul] bash scripts/gpu/fp8-visit.sh STAGE
# STAGE: kvc and cuda_kernels (CUDA builds), llama3-tok/ (tokenizer.json, tokenizer_config.json
# and tokenizer.model of a Llama-3.1 checkpoint make_checkpoint.py wrote). Steps as in
# visit-lib.sh: logged under $OUT/<step>.txt, skipped on a warm machine that finished them.
set -uo pipefail
stage=$1
kvc=$stage/kvc
arch=${ARCH:-llama-3.1-8b}
ck=/tmp/ckpt/$arch-fp8${LAYERS:+-l$LAYERS}
tag=$arch${LAYERS:+-l$LAYERS}
source scripts/gpu/visit-lib.sh
export KVC_NCCL_LIB=${KVC_NCCL_LIB:-/usr/lib/x86_64-linux-gnu/libnccl.so.2}
[[ -n ${SKIP_TESTS:-} ]] || step cuda-tests timeout 240 "$stage/cuda_kernels" --test-threads=1
step "ckpt-$tag" python3 scripts/gpu/make_checkpoint.py "$arch" "$ck" --fp8 row \
  ${LAYERS:+--layers "$LAYERS"} --tokenizer-dir "$stage/llama3-tok" || exit 1
prompt="Summarize the following. $(printf 'The quick brown fox jumps over the lazy dog. %.0s' $(seq 60))"
bench() {  # MODE
  "$kvc" bench-model -m "$ck" --device cuda:0 --fp8 "$1" --prompt-lens 4000,32000 \
    --prefill-chunk 8192 --decode-tokens 64 --repeats 1
}
gen() {  # MODE
  "$kvc" generate -m "$ck" --device cuda:0 --fp8 "$1" --max-new-tokens 16 --json -p "$prompt"
}
ruler() {
  "$kvc" eval -m "$ck" --device cuda:0 --tasks ruler:niah_single_1 --lengths 32768 \
    --ruler-samples 1 --methods full,kvcompress --rates 2,8,64 --no-progress --out /tmp/fp8-eval \
    && tar czf "$out/eval-$tag.tar.gz" -C /tmp fp8-eval
}
for mode in ${MODES:-matmul dequantize}; do
  step "bench-$mode-$tag" bench "$mode"
  step "generate-$mode-$tag" gen "$mode"
done
[[ -z ${EVAL:-} ]] || step "eval-$tag" ruler
