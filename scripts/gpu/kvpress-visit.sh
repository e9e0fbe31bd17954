#!/usr/bin/env bash
# Issue 28 on one GPU: kvc's RULER table (SmolLM2, 4k and 8k, 20 samples per task, rates 2-64,
# both protocols) and the side-by-side with kvpress on the same prompts. Resumable on a warm
# machine: each phase resumes its own files, and every call tars what exists into $OUT.
#   bash scripts/gpu/kvpress-visit.sh STAGE SECONDS
# STAGE holds: kvc (CUDA build), model.gguf (SmolLM2 Q4_1), ruler-sources/
# (scripts/fetch-ruler-sources.sh), prompts.jsonl (`kvc eval --tasks ruler --lengths 4096,8192
# --ruler-samples 20 --export-prompts`), pywhl/ (kvpress 0.5.5 and its pinned transformers
# 5.2.0, tokenizers 0.22.2, huggingface_hub 1.x, gguf, cachetools: installed under /tmp/pyk).
# SECONDS: this call's time for the phases; each phase stops cleanly (SIGINT / --deadline).
# Env: SIDE_N (prompts per subset in the side-by-side, 4k only; default 4), SIDE_METHODS,
# SIDE_RATES, TABLE_METHODS (comma-separated, run in order), TABLE_GROUPS (parallel groups, see
# phase 3), TABLE_BATCH (--batch-samples per process), SKIP_SIDE=1 (the table only), SKIP_TABLE=1
# (the side-by-side only), VISIT_WORK (the scratch directory, /tmp by default). The two halves can
# run at once on one GPU as two invocations with their own VISIT_WORK and OUT.
set -uo pipefail
stage=$1 budget=$2
# The machine's scratch: the trees, the groups' copies, the phase markers (tests use another).
W=${VISIT_WORK:-/tmp}
out=${OUT:-gpu-out}
mkdir -p "$out" $W/visit
t0=$SECONDS
left() { echo $((budget - (SECONDS - t0))); }
kvc=$stage/kvc
n=${SIDE_N:-4}
side_methods=${SIDE_METHODS:-snapkv,tova,knorm,keydiff,streamingllm,random,lagkv}
side_rates=${SIDE_RATES:-2,8}
export KVC_RULER_SOURCES=$stage/ruler-sources
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# A fresh machine goes on from an earlier call's results (STAGE/results.tar.gz, that call's
# $OUT/results.tar.gz): every phase resumes its rows.
if [[ -f $stage/results.tar.gz && ! -d $W/table ]]; then tar xzf "$stage/results.tar.gz" -C "$W"; fi
[[ -n ${SKIP_SIDE:-} || -d $W/pyk/kvpress ]] || python3 -m pip install --no-deps -q --target $W/pyk "$stage"/pywhl/*.whl

# 1. kvc on the side-by-side's prompts (the first $n rows of each 4k subset), context-only as
#    kvpress's pipeline runs them: the timing of kvc's half of the comparison.
if [[ ! -f $W/visit/side-kvc && -z ${SKIP_SIDE:-} ]]; then
  s=$SECONDS
  "$kvc" eval --model "$stage/model.gguf" --tasks ruler --lengths 4096 --ruler-samples 20 \
    --limit "$n" --methods "$side_methods" --rates "$side_rates" --question-in-window no \
    --device cuda:0 --no-progress --out $W/side-kvc > "$out/side-kvc.txt" 2>&1 \
    && touch $W/visit/side-kvc
  echo "side-kvc rc=$? wall_s=$((SECONDS - s))" | tee -a "$out/side-kvc.txt"
fi

# 2. kvpress on the same prompts, methods and rates.
if [[ ! -f $W/visit/side-kvpress && -z ${SKIP_SIDE:-} ]] && (( $(left) > 60 )); then
  s=$SECONDS
  python3 - "$stage/prompts.jsonl" "$n" > $W/side-prompts.jsonl <<'EOF'
import json, sys
seen = {}
for line in open(sys.argv[1]):
    p = json.loads(line)
    if not p["task"].endswith("_4096"):
        continue
    seen[p["task"]] = seen.get(p["task"], 0) + 1
    if seen[p["task"]] <= int(sys.argv[2]):
        print(line, end="")
EOF
  PYTHONPATH=$W/pyk python3 scripts/gpu/kvpress_side_by_side.py "$stage" model.gguf \
    $W/side-prompts.jsonl $W/side-kvpress --methods "$side_methods" --rates "$side_rates" \
    --deadline $(( $(left) - 30 )) >> "$out/side-kvpress.txt" 2>&1
  rc=$?
  grep -q "^done" "$out/side-kvpress.txt" && touch $W/visit/side-kvpress
  echo "side-kvpress rc=$rc wall_s=$((SECONDS - s))" | tee -a "$out/side-kvpress.txt"
fi

# 3. kvc's RULER table: one `kvc eval` per group of methods (the RULER prompts are generated once
#    per invocation, ~23 s); stopped by SIGINT at the call's end, it resumes row by row.
#    TABLE_GROUPS ("a,b;c,d;..."): the groups run as parallel processes on the one GPU (SmolLM2's
#    batches leave it mostly idle: the host's per-step work bounds each process), each into its
#    own copy of the tree, merged back run by run (a run directory belongs to one group). A group
#    ending in @yes or @no runs that protocol only, so one method's two halves can run in two
#    processes.
table_methods=${TABLE_METHODS:-snapkv,tova,knorm,keydiff,random,lagkv,expected-attention,streamingllm,pyramidkv,ada-snapkv,h2o,kvcompress,snapkv+kvcrush}
IFS=';' read -r -a groups <<< "${TABLE_GROUPS:-$table_methods}"
if [[ ! -f $W/visit/table && -z ${SKIP_TABLE:-} ]] && (( $(left) > 60 )); then
  s=$SECONDS
  mkdir -p $W/table/model
  pids=(); qiws=()
  for g in "${!groups[@]}"; do
    # A group "methods@yes" or "methods@no" runs one protocol only (--question-in-window).
    qiw=both; [[ ${groups[$g]} == *@yes || ${groups[$g]} == *@no ]] && qiw=${groups[$g]##*@}
    groups[$g]=${groups[$g]%@yes}; groups[$g]=${groups[$g]%@no}; qiws[$g]=$qiw
    rm -rf "$W/table-g$g"; cp -r $W/table "$W/table-g$g"
    timeout -s INT $(( $(left) - 30 )) "$kvc" eval --model "$stage/model.gguf" --tasks ruler \
      --lengths 4096,8192 --ruler-samples 20 --methods "${groups[$g]}" \
      --rates 2,4,8,16,32,64 --question-in-window $qiw --device cuda:0 --no-progress \
      ${TABLE_BATCH:+--batch-samples $TABLE_BATCH} \
      --out "$W/table-g$g" > "$out/table-g$g.txt" 2>&1 &
    pids+=($!)
  done
  ok=1
  for g in "${!groups[@]}"; do
    wait "${pids[$g]}"; rc=$?
    echo "table group $g (${groups[$g]}) rc=$rc" | tee -a "$out/table.txt"
    (( rc == 0 )) || ok=0
    for m in ${groups[$g]//,/ }; do
      # only the protocols this group ran: its copy of the tree holds stale others
      dirs=()
      [[ ${qiws[$g]} == no ]] || dirs+=("$W/table-g$g/model/$m")
      [[ ${qiws[$g]} == yes ]] || dirs+=("$W/table-g$g/model/$m@context-only")
      for d in "${dirs[@]}"; do
        [[ -d $d ]] && rm -rf "$W/table/model/${d##*/}" && cp -r "$d" $W/table/model/
      done
    done
  done
  # Every group also runs (or resumes) the full cache; keep the copy with the most rows.
  best=; most=-1
  for g in "${!groups[@]}"; do
    n=$(cat "$W/table-g$g"/model/full/*/preds/*.jsonl 2>/dev/null | wc -l)
    (( n > most )) && most=$n && best=$g
  done
  if [[ -n $best && -d $W/table-g$best/model/full ]]; then
    rm -rf $W/table/model/full && cp -r "$W/table-g$best/model/full" $W/table/model/
  fi
  (( ok )) && touch $W/visit/table
  echo "table wall_s=$((SECONDS - s))" | tee -a "$out/table.txt"
fi

tar czf "$out/results.tar.gz" -C "$W" side-kvc side-kvpress table 2>/dev/null
ls $W/visit; tail -n 12 "$out/side-kvpress.txt" 2>/dev/null; grep "rc=" "$out"/*.txt
