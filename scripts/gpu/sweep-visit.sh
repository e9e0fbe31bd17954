#!/usr/bin/env bash
# Issue 26's sweep checks on one GPU: the SmolLM2 LongBench sweep (3 real subsets x 200 rows,
# full + kvcompress 2-64) with the binary before and after a change (kvc-old, kvc), then a
# LongBench-shaped sweep at Llama-3.1-8B's shape (random weights: speed only) with KVC_PROFILE,
# and a profiled batch-1 decode at 4k.
#   bash scripts/gpu/sweep-visit.sh STAGE GGUF
# STAGE: kvc, kvc-old (CUDA builds), llama3/tokenizer.model, whl/, longbench/ (the 3 subsets).
set -uo pipefail
stage=$1 gguf=$2
ck=/tmp/ckpt
mkdir -p "$ck"
source scripts/gpu/visit-lib.sh
sweep() {  # BINARY OUTDIR EXTRA...: the 3 subsets x 200 rows, full + kvcompress 2-64
  local bin=$1 o=$2; shift 2
  "$bin" eval --model "$gguf" --data-dir "$stage/longbench" \
    --tasks multi_news,multifieldqa_zh,passage_retrieval_zh --limit 200 --methods kvcompress \
    --rates 1,2,4,8,16,32,64 --device cuda:0 --no-progress --out "$o" "$@"
}
L=$ck/llama-3.1-8b
# A one-row warm-up per binary (driver JIT of candle's PTX), then the timed sweeps.
step warm-old sweep "$stage/kvc-old" /tmp/warm-old --limit 1
step warm-new sweep "$stage/kvc" /tmp/warm-new --limit 1
step sweep-old sweep "$stage/kvc-old" /tmp/sweep-old
step sweep-new sweep "$stage/kvc" /tmp/sweep-new
step compare python3 - /tmp/sweep-old /tmp/sweep-new <<'PY'
import json, pathlib, sys
a, b = map(pathlib.Path, sys.argv[1:3])
same = diff = 0
for fa in sorted(a.glob("*/*/*/preds/*.jsonl")):
    fb = b / fa.relative_to(a)
    ra = [json.loads(l)["pred"] for l in fa.open()]
    rb = [json.loads(l)["pred"] for l in fb.open()] if fb.exists() else []
    s = sum(x == y for x, y in zip(ra, rb)); same += s; diff += len(ra) - s
    print(fa.relative_to(a), len(ra), "identical", s)
print(f"TOTAL identical {same} of {same + diff}")
PY
cp /tmp/sweep-old/scores.csv "$out/scores-old.csv" 2>/dev/null; cp /tmp/sweep-new/scores.csv "$out/scores-new.csv" 2>/dev/null
step ckpt-llama python3 scripts/gpu/make_checkpoint.py llama-3.1-8b "$L" \
  --tokenizer-model "$stage/llama3/tokenizer.model"
step sweep-8b env KVC_PROFILE=1 "$stage/kvc" eval -m "$L" --data-dir "$stage/longbench" \
  --tasks multi_news,multifieldqa_zh,passage_retrieval_zh --limit 4 --methods kvcompress \
  --rates 1,2,4,8,16,32,64 --device cuda:0 --no-progress --out "$out/sweep-8b"
step decode-profile-4k env KVC_PROFILE=1 "$stage/kvc" bench-model -m "$L" --device cuda:0 \
  --prompt-lens 4000 --decode-tokens 256 --repeats 1
cat "$out/gpu.txt"
for f in "$out"/*.txt; do echo "-- $(basename "$f"): $(tail -n 1 "$f")"; done
grep -h "TOTAL" "$out/compare.txt"
grep -h "eval:\|in .* s\|wall" "$out"/sweep-*.txt | head
