#!/usr/bin/env bash
# The README's first command, exactly as a newcomer runs it: in a fresh clone of the commit
# being tested, the first code block under "## Two commands" in README.md is run with bash, then
# run again (the resume). Each run must exit 0 and leave results/scores.csv, results/summary.csv
# and at least one plot under results/plots/. .ci/run calls this through scripts/test.sh.
#   scripts/readme-main-job.sh          # clones HEAD (committed files only) into a temp dir
# Set CARGO_TARGET_DIR to reuse a build; by default the clone builds into this checkout's
# target/ (cargo keys artifacts by path, so only the kvc crate itself is rebuilt when warm).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$src/target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/kvc"
cd "$work/kvc"
cmd=$(awk '/^## Two commands/{s=1} s&&/^```/{if(b){exit}; b=1; next} b{print}' README.md)
[[ -n $cmd ]] || { echo "readme-main-job: no code block under '## Two commands' in README.md" >&2; exit 2; }
echo "readme-main-job: in a fresh clone of $(git rev-parse --short HEAD): $cmd" >&2
check() {
  local what=$1
  [[ -s results/scores.csv ]] || { echo "readme-main-job: $what: no results/scores.csv" >&2; exit 1; }
  [[ -s results/summary.csv ]] || { echo "readme-main-job: $what: no results/summary.csv" >&2; exit 1; }
  compgen -G "results/plots/*.png" >/dev/null || { echo "readme-main-job: $what: no plot in results/plots/" >&2; exit 1; }
  grep -qi '^smollm2' results/scores.csv || { echo "readme-main-job: $what: scores.csv has no SmolLM2 row" >&2; exit 1; }
}
bash -c "$cmd" </dev/null >"$work/first.out"
check "first run"
bash -c "$cmd" </dev/null >"$work/second.out" 2>"$work/second.err"
check "second run"
grep -q "0 new, " "$work/second.err" || { echo "readme-main-job: the rerun did not resume:" >&2; cat "$work/second.err" >&2; exit 1; }
if grep -E "[1-9][0-9]* new, " "$work/second.err" >&2; then
  echo "readme-main-job: the rerun generated samples again instead of resuming" >&2; exit 1
fi
echo "readme-main-job: ok (exit 0 twice; scores.csv, summary.csv, $(ls results/plots/*.png | wc -l) plots)" >&2
