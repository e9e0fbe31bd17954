#!/usr/bin/env bash
# Nightly quality regression run (issue 3).
#
# What it does:
#   1. generation: a fixed subset of LongBench at fixed compression rates, written as a results
#      tree  $RESULTS/<model>/<method>/<budget>/preds/<subset>.jsonl  (+ run.json).
#      The generation command belongs to the eval pipeline (not part of this script yet): set
#      KVC_NIGHTLY_GENERATE to the command that fills $RESULTS, e.g.
#        KVC_NIGHTLY_GENERATE='kvc eval --model smollm2-135m --tasks en16 --methods full,kvcompress --rates 1,8,64 --limit 20 --out "$RESULTS"'
#      Without it, the script scores whatever tree is already in $RESULTS.
#   2. scoring:  kvc score $RESULTS          -> $RESULTS/scores.csv, summary.csv
#   3. the gate: kvc compare against the committed baseline, exit 1 on a drop beyond
#      $TOLERANCE points in any subset or category.
#
# Env: RESULTS (default results/nightly), BASELINE (default results/baselines/nightly.csv),
#      TOLERANCE (default 1.0 LongBench points), KVC (default: cargo run --release --bin kvc --).
# Refresh the baseline after an intended change: cp "$RESULTS/scores.csv" "$BASELINE".
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-results/nightly}"
BASELINE="${BASELINE:-results/baselines/nightly.csv}"
TOLERANCE="${TOLERANCE:-1.0}"
KVC="${KVC:-cargo run --quiet --release --bin kvc --}"

if [[ -n "${KVC_NIGHTLY_GENERATE:-}" ]]; then
  echo "nightly: generating into $RESULTS" >&2
  RESULTS="$RESULTS" bash -c "$KVC_NIGHTLY_GENERATE"
fi
# Exit 1 from score (failed samples) is reported but does not stop the gate.
$KVC score "$RESULTS" --require-full || [[ $? -eq 1 ]]
if [[ ! -f "$BASELINE" ]]; then
  echo "nightly: no baseline at $BASELINE; to start one: cp $RESULTS/scores.csv $BASELINE" >&2
  exit 2
fi
$KVC compare --baseline "$BASELINE" --current "$RESULTS/scores.csv" --tolerance "$TOLERANCE"
