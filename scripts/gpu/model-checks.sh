#!/usr/bin/env bash
# Model-layer checks on the GPU machine (issue 2), after staging (../shared/gpu/README.md):
# conformance against the transformers reference in f32 and bf16, and bench-model in bf16 and
# f32. Writes logs and JSON under $OUT (default ./gpu-out) and prints a short summary last.
#   bash scripts/gpu/model-checks.sh /tmp/kvc/target/kvc-gpu /tmp/kvc/models/SmolLM2-135M-Instruct.Q4_1.gguf REFDIR
# REFDIR holds smollm2_greedy.jsonl, smollm2_transformers_rederived.jsonl and longbench/*.jsonl.
set -uo pipefail
kvc=$1 model=$2 ref=$3
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
for dt in f32 bf16; do
  "$kvc" conformance --model "$model" --device cuda:0 --dtype "$dt" \
    --reference "$ref/smollm2_greedy.jsonl" --rederived "$ref/smollm2_transformers_rederived.jsonl" \
    --longbench "$ref/longbench" > "$out/conformance-$dt.txt" 2>&1
  echo "conformance $dt rc=$?" >> "$out/rc.txt"
done
for dt in bf16 f32; do
  "$kvc" bench-model --model "$model" --device cuda:0 --dtype "$dt" --prompt-lens 500,1000,2000,4000,7000 \
    --decode-tokens 256 --repeats 3 --csv "$out/bench-model-$dt.csv" > "$out/bench-model-$dt.txt" 2>&1
  echo "bench-model $dt rc=$?" >> "$out/rc.txt"
done
cat "$out/gpu.txt" "$out/rc.txt"
tail -n 4 "$out"/conformance-*.txt
cat "$out"/bench-model-*.txt
