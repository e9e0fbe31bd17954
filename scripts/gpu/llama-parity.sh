#!/usr/bin/env bash
# Llama-3.1-8B at its real shape, kvc against transformers on one random-weight checkpoint (GPU
# machine; resumable: every step skips what /tmp already holds while the machine is warm).
#   bash scripts/gpu/llama-parity.sh KVC TOKENIZER_MODEL MULTI_NEWS_JSONL WHEELS_DIR
# 1. the checkpoint as transformers 5 saves it (rope_parameters), written there (16 GB);
#    a twin directory with the legacy rope_theta + rope_scaling config (weights symlinked);
# 2. transformers' greedy references (f32 and bf16) for chat prompts of ~3k and ~30k tokens;
# 3. kvc conformance on them: f32 contiguous (generate's path) and paged (eval's kernels, a
#    keep-all KV-Compress budget), bf16 contiguous, and f32 on the legacy config.
# Logs under $OUT; the summary last.
set -uo pipefail
kvc=$1 tokmodel=$2 data=$3 wheels=$4
out=${OUT:-gpu-out}
ck=/tmp/ckpt/llama-3.1-8b
mkdir -p "$out" /tmp/ckpt
export PYTHONPATH=/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}
[[ -d /tmp/pylib/tiktoken ]] || python3 -m pip install --no-deps -q --target /tmp/pylib "$wheels"/*.whl
step() { echo "== $*" >&2; }
if [[ ! -f $ck/tokenizer_config.json ]]; then
  step "checkpoint"; python3 scripts/gpu/make_checkpoint.py llama-3.1-8b "$ck" --tokenizer-model "$tokmodel" \
    > "$out/checkpoint.json" 2> "$out/checkpoint.err" || { tail "$out/checkpoint.err"; exit 1; }
fi
if [[ ! -f $ck-legacy/config.json ]]; then
  mkdir -p "$ck-legacy"
  for f in "$ck"/*; do [[ $(basename "$f") == config.json ]] || ln -sf "$f" "$ck-legacy/"; done
  python3 - "$ck/config.json" "$ck-legacy/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
p = c.pop("rope_parameters")
c["rope_theta"] = p.pop("rope_theta")
c["rope_scaling"] = p
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
fi
ref=/tmp/ckpt/ref
for dt in float32 bfloat16; do
  s=${dt/float32/f32}; s=${s/bfloat16/bf16}
  [[ -f $ref/reference-$s.jsonl ]] || { step "transformers $dt"; python3 scripts/gpu/llama_reference.py "$ck" "$data" "$ref" \
    --tokens 3000,30000 --dtype "$dt" > "$out/transformers-$s.txt" 2>&1 || tail "$out/transformers-$s.txt"; }
done
cp "$ref"/*.jsonl "$out/" 2>/dev/null
conf() {  # NAME CKPT DTYPE EXTRA...
  local name=$1 dir=$2 dt=$3; shift 3
  [[ -f $out/conformance-$name.txt ]] && return
  step "kvc conformance $name"
  "$kvc" conformance --model "$dir" --device cuda:0 --dtype "$dt" --reference "$ref/reference-$dt.jsonl" \
    --rederived "$ref/rederived-$dt.jsonl" "$@" > "$out/conformance-$name.txt" 2>&1
  echo "rc=$?" >> "$out/conformance-$name.txt"
}
conf f32-contiguous "$ck" f32
conf f32-paged "$ck" f32 --cache paged
# bf16: logits near 8-16 move in steps of 0.0625; a divergence within about one step is a tie.
conf bf16-contiguous "$ck" bf16 --logit-tol 0.25 --tie-margin 0.07
conf f32-legacy-config "$ck-legacy" f32 --only 3k
conf f32-paged-chunk8192 "$ck" f32 --cache paged --prefill-chunk 8192
nvidia-smi --query-gpu=name --format=csv,noheader
cat "$out"/transformers-*.txt
tail -n 6 "$out"/conformance-*.txt
