#!/usr/bin/env bash
# LongBench sweep on the GPU machine, resumable across device calls (each call is capped at
# 10 minutes): results live in /tmp/kvc/results while the machine stays warm, and every call
# returns a tarball of them under $OUT. Rerun the same command to resume.
#   LIMIT=8 METHODS=kvcompress RATES=1,2,4,8,16,32,64 \
#     bash scripts/gpu/eval-sweep.sh /tmp/kvc/target/kvc-gpu /tmp/kvc/models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/kvc/.gpu-ref/longbench
set -uo pipefail
kvc=$1 model=$2 data=$3
out=${OUT:-gpu-out}
res=${RESULTS:-/tmp/kvc/results}
mkdir -p "$out" "$res"
TASKS=${TASKS:-multi_news,multifieldqa_zh,passage_retrieval_zh}
start=$SECONDS
# SIGINT: kvc finishes the sample in flight, flushes and exits; rerun to resume.
timeout --foreground -s INT "${BUDGET_S:-500}" "$kvc" eval --model "$model" --data-dir "$data" --tasks "$TASKS" \
  --limit "${LIMIT:-8}" --methods "${METHODS:-kvcompress}" --rates "${RATES:-1,2,4,8,16,32,64}" \
  --device cuda:0 --out "$res" --no-progress ${EXTRA:-} > "$out/eval-$(date +%H%M%S).log" 2>&1
echo "eval rc=$? after $((SECONDS - start)) s"
tar -czf "$out/results.tgz" -C "$(dirname "$res")" "$(basename "$res")"
tail -n 30 "$out"/eval-*.log
