#!/usr/bin/env bash
# Issue 28's RULER table on one GPU: SmolLM2 (the GGUF), RULER at 4096 and 8192 tokens, 20
# samples per task, $METHODS at rates 2-64 in both protocols (--question-in-window both). One
# call per method group fits a lease; each leaves its tree in $OUT/ruler-NAME.tar.gz (the full
# cache in every one: it is the baseline), and `kvc score` on the union of the unpacked trees
# makes the table.
#   METHODS=snapkv,tova bash scripts/gpu/ruler-visit.sh STAGE GGUF NAME
# STAGE: kvc (CUDA build), whl/ (see visit-lib.sh).
set -uo pipefail
stage=$1 gguf=$2 name=$3
source scripts/gpu/visit-lib.sh
step "ruler-$name" "$stage/kvc" eval --model "$gguf" --tasks ruler --lengths 4096,8192 \
  --ruler-samples 20 --methods "${METHODS:-snapkv}" --rates 2,4,8,16,32,64 \
  --question-in-window both --device cuda:0 --no-progress --out "/tmp/ruler-$name"
rc=$?
tar czf "$out/ruler-$name.tar.gz" -C /tmp "ruler-$name"
tail -n 25 "$out/ruler-$name.txt"
exit $rc
