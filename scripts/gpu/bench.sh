#!/usr/bin/env bash
# `kvc bench` (issue 7, the KV-Compress throughput benchmark) on the GPU machine, resumable
# across device calls (each call is capped at 10 minutes): results live in /tmp/kvc/results while
# the machine stays warm (`--resume` skips the (rate, input length) pairs already measured), and
# every call returns a tarball of them under $OUT plus the log. Rerun the same command to resume.
#   bash scripts/gpu/bench.sh /tmp/kvc/target/kvc-gpu /tmp/kvc/models/SmolLM2-135M-Instruct.Q4_1.gguf
# Environment (defaults = the paper's benchmark, a memory-bound pool for SmolLM2-135M bf16:
# 1 GiB holds ~16 full-cache sequences of 2000+500 tokens, 23.8 KB per token over 30x3 heads):
#   RATES=1,2,4,8,16,32,64 INPUT_LENS=500,1000,2000,4000,6000 OUTPUT_LEN=500 NUM_PROMPTS=256
#   KV_MEMORY=1GiB BUDGET_S=540 EXTRA="--no-decode-metric"
# MODE=hfcompare runs the full-cache point that compares with transformers `generate` (batch 32,
# 2000-token prompts, not memory-bound): divide its output_tokens_per_s by transformers' 369
# tokens/s measured on the same GPU (see docs/findings/2026-11-23-bench-h100-prefill-bound-2x.md).
set -uo pipefail
kvc=$1 model=$2
out=${OUT:-gpu-out}
res=${RESULTS:-/tmp/kvc/results}
mkdir -p "$out" "$res"
start=$SECONDS
if [ "${MODE:-sweep}" = hfcompare ]; then
  args=(--rates 1 --input-lens 2000 --output-len "${OUTPUT_LEN:-500}" --num-prompts 32
        --max-batch 32 --kv-memory "${KV_MEMORY:-0.5}" --out "$res/hfcompare")
else
  args=(--rates "${RATES:-1,2,4,8,16,32,64}" --input-lens "${INPUT_LENS:-500,1000,2000,4000,6000}"
        --output-len "${OUTPUT_LEN:-500}" --num-prompts "${NUM_PROMPTS:-256}"
        --kv-memory "${KV_MEMORY:-1GiB}" --out "$res")
fi
# SIGINT ends the configuration in flight (lost); finished ones are already in throughput.csv.
timeout --foreground -s INT "${BUDGET_S:-540}" "$kvc" bench --model "$model" --device cuda:0 \
  "${args[@]}" --resume --no-progress ${EXTRA:-} > "$out/bench-$(date +%H%M%S).log" 2>&1
echo "bench rc=$? after $((SECONDS - start)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
tar -czf "$out/results.tgz" -C "$(dirname "$res")" "$(basename "$res")"
tail -n 45 "$out"/bench-*.log
