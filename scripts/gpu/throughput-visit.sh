#!/usr/bin/env bash
# Issue 26's throughput experiment on one GPU: the KV-Compress paper's L4 regime at Llama-3.1-8B's
# shape (random weights written here: speed only): a 6 GiB KV pool, input 6000 / output 500,
# rates 1-64, the reference's schedule and kvc's (`--schedule both`), then the same with 90 % of
# the card's free memory. Resumable: rerun with the same STAGE on a warm machine and `kvc bench
# --resume` keeps the rows already measured (the CSV is rewritten after every row).
#   PROMPTS=64 bash scripts/gpu/throughput-visit.sh STAGE
# STAGE: kvc (CUDA build), llama3/tokenizer.model, whl/ (tiktoken, regex wheels).
# RATES (default 1,2,4,8,16,32,64), SCHEDULE (default both), BUDGET_S (per bench, default 480);
# RESUME_FROM: a directory holding an earlier machine's pool-6g/ and pool-0.9/ (the rows a
# lost lease returned under $OUT), copied in before the benches so --resume keeps them.
set -uo pipefail
stage=$1
kvc=$stage/kvc
ck=/tmp/ckpt
mkdir -p "$ck" /tmp/bench
source scripts/gpu/visit-lib.sh
L=$ck/llama-3.1-8b
step ckpt-llama python3 scripts/gpu/make_checkpoint.py llama-3.1-8b "$L" \
  --tokenizer-model "$stage/llama3/tokenizer.model" || exit 1
for d in pool-6g pool-0.9; do
  if [[ -n ${RESUME_FROM:-} && -d $RESUME_FROM/$d && ! -d /tmp/bench/$d ]]; then
    cp -r "$RESUME_FROM/$d" /tmp/bench/
  fi
done
bench() {  # NAME KV_MEMORY
  timeout -s INT "${BUDGET_S:-480}" "$kvc" bench -m "$L" --device cuda:0 --kv-memory "$2" \
    --input-lens 6000 --output-len 500 --num-prompts "${PROMPTS:-64}" --rates "${RATES:-1,2,4,8,16,32,64}" \
    --schedule "${SCHEDULE:-both}" --no-progress --resume --out "/tmp/bench/$1" >> "$out/bench-$1.txt" 2>&1
  echo "bench $1 rc=$?" | tee -a "$out/bench-$1.txt"
  cp -r "/tmp/bench/$1" "$out/" 2>/dev/null
}
t0=$SECONDS
bench pool-6g 6GiB
if (( SECONDS - t0 < 300 )); then BUDGET_S=$((540 - (SECONDS - t0))) bench pool-0.9 0.9; fi
cat "$out/gpu.txt"; tail -n 20 "$out"/bench-*.txt
