#!/usr/bin/env bash
# Issue 27 on one GPU: a sweep unsharded, as 2 shards run one after the other + `kvc merge`, and
# with `--devices cuda:0,cuda:0` (two workers sharing the GPU); scores.csv, summary.csv and
# every result.json compared byte for byte, predictions counted. Model: a 2-layer random
# Llama-3.1-8B-shaped checkpoint written here (make_checkpoint.py --layers 2); data: the bundled
# LongBench sample (3 subsets x 2 rows).
#   bash scripts/gpu/shards-visit.sh STAGE     (STAGE: kvc, llama3/tokenizer.model, whl/)
set -uo pipefail
stage=$1
kvc=$stage/kvc
out=${OUT:-gpu-out}
ck=/tmp/ckpt/llama-2l
r=/tmp/shards
mkdir -p "$out" "$r"
export PYTHONPATH=/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}
[[ -d /tmp/pylib/tiktoken ]] || python3 -m pip install --no-deps -q --target /tmp/pylib "$stage"/whl/*.whl
[[ -f $ck/config.json ]] || python3 scripts/gpu/make_checkpoint.py llama-3.1-8b "$ck" --layers 2 \
  --tokenizer-model "$stage/llama3/tokenizer.model" > "$out/ckpt.txt" 2>&1
args=(-m "$ck" --tasks multi_news,multifieldqa_zh,passage_retrieval_zh --rates 1,8 --max-new-tokens 16 --no-progress)
timed() {  # NAME CMD...
  local t0=$SECONDS; "${@:2}" > "$out/$1.txt" 2>&1; echo "$1: rc=$? wall_s=$((SECONDS - t0))" | tee -a "$out/summary.txt"
}
timed unsharded "$kvc" eval "${args[@]}" --out "$r/one"
timed shard0 "$kvc" eval "${args[@]}" --out "$r/seq" --shard 0/2
timed shard1 "$kvc" eval "${args[@]}" --out "$r/seq" --shard 1/2
timed merge "$kvc" merge "$r/seq"
timed devices "$kvc" eval "${args[@]}" --out "$r/dev" --devices cuda:0,cuda:0
for d in seq dev; do
  for f in scores.csv summary.csv $(cd "$r/one" && find . -name result.json | sort); do
    cmp -s "$r/one/$f" "$r/$d/$f" && echo "$d same: $f" || echo "$d DIFFERENT: $f"
  done | tee -a "$out/summary.txt"
  python3 - "$r/one" "$r/$d" <<'PY' | tee -a "$out/summary.txt"
import glob, json, os, sys
a, b = sys.argv[1:3]
same = total = 0
for f in glob.glob(f"{a}/*/*/*/preds/*.jsonl"):
    pa = {json.loads(l)["_id"]: json.loads(l)["pred"] for l in open(f)}
    pb = {json.loads(l)["_id"]: json.loads(l)["pred"] for l in open(f.replace(a, b, 1))}
    total += len(pa); same += sum(pa[k] == pb.get(k) for k in pa)
print(f"{os.path.basename(b)}: predictions identical {same}/{total}")
PY
done
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$out/summary.txt"
tar -czf "$out/shards.tgz" -C "$r" . 2>/dev/null
