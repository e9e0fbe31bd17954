#!/usr/bin/env bash
# A/B of two kvc CUDA binaries on the full-size SmolLM2 KV-Compress sweep (3 real LongBench
# subsets x 200 rows x full + kvcompress 2..64) on one GPU, one after the other in one lease:
# wall time of each and predictions compared row by row. Resumable: each binary's results live
# in /tmp/kvc/ab/<name> while the machine is warm; rerun to finish a sweep cut by the 10-minute
# call limit (the timing of a resumed sweep is then partial, and says so).
#   bash scripts/gpu/ab-sweep.sh NAME_A KVC_A NAME_B KVC_B MODEL DATA_DIR
# Writes $OUT/ab-<name>.log (kvc's stderr + `time`), $OUT/ab-summary.txt.
set -uo pipefail
na=$1 ka=$2 nb=$3 kb=$4 model=$5 data=$6
out=${OUT:-gpu-out}
root=/tmp/kvc/ab
mkdir -p "$out" "$root"
sweep() {  # NAME KVC
  local name=$1 kvc=$2 t0=$SECONDS
  [[ -f $root/$name.done ]] && { echo "$name: done before ($(cat "$root/$name.done") s)"; return; }
  timeout --foreground -s INT "${BUDGET_S:-280}" "$kvc" eval --model "$model" --data-dir "$data" \
    --tasks multi_news,multifieldqa_zh,passage_retrieval_zh --methods kvcompress \
    --rates 1,2,4,8,16,32,64 --device cuda:0 --out "$root/$name" --no-progress \
    > "$out/ab-$name.log" 2>&1
  local rc=$? dt=$((SECONDS - t0))
  echo "$name: rc=$rc wall=${dt}s" | tee -a "$out/ab-summary.txt"
  [[ $rc == 0 ]] && echo "$dt" > "$root/$name.done"
}
warm() {  # the driver JIT-compiles candle's PTX on a machine's first run: pay it outside
  [[ -f $root/warm.done ]] && return
  for k in "$ka" "$kb"; do
    "$k" eval --model "$model" --data-dir "$data" --tasks multi_news --limit 1 --rates 1,2 \
      --device cuda:0 --out "$root/warm" --no-progress --overwrite > /dev/null 2>&1
  done
  touch "$root/warm.done"
}
warm
sweep "$na" "$ka"
sweep "$nb" "$kb"
if [[ -f $root/$na.done && -f $root/$nb.done ]]; then
  python3 - "$root/$na" "$root/$nb" <<'PY' | tee -a "$out/ab-summary.txt"
import glob, json, os, sys
a, b = sys.argv[1], sys.argv[2]
tot = same = 0
for fa in sorted(glob.glob(os.path.join(a, "**", "preds", "*.jsonl"), recursive=True)):
    rel = os.path.relpath(fa, a)
    fb = os.path.join(b, rel)
    ra = {r["_id"]: r["pred"] for r in map(json.loads, open(fa))}
    rb = {r["_id"]: r["pred"] for r in map(json.loads, open(fb))} if os.path.exists(fb) else {}
    s = sum(ra[k] == rb.get(k) for k in ra)
    tot += len(ra); same += s
    print(f"{rel}: {s}/{len(ra)}")
print(f"TOTAL identical predictions: {same}/{tot}")
PY
  tail -n 12 "$out/ab-$nb.log"
fi
