#!/usr/bin/env bash
# The Slurm path for real, on this machine: a one-node cluster (local-cluster.sh), a 3-task
# array of `kvc eval --shard` on the CPU with SmolLM2 on the bundled sample, the dependent merge
# job, and a check that the merged sweep's scores.csv, summary.csv and every result.json equal
# an unsharded run's byte for byte. Exit 0 when equal.
#   bash scripts/slurm/test-local.sh      (KVC_BIN: a built kvc; default target/release/kvc)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
kvc=${KVC_BIN:-$root/target/release/kvc}
[[ -x $kvc ]] || (cd "$root" && cargo build --release --locked --bin kvc)
export KVC_MODELS_DIR=${KVC_MODELS_DIR:-$root/models}
work=$(mktemp -d)
trap 'bash "$here/local-cluster.sh" stop; rm -rf "$work"' EXIT
env_line=$(bash "$here/local-cluster.sh" start) || { echo "test-local: no cluster to test on" >&2; exit 1; }
eval "$env_line"
args="--tasks multi_news,multifieldqa_zh --limit 2 --rates 1,8"
# shellcheck disable=SC2086
"$kvc" eval $args --out "$work/one" --no-progress -q > "$work/one.log" 2>&1 || { cat "$work/one.log"; exit 1; }
jobs=$(KVC_OUT=$work/sharded KVC_ARGS=$args KVC_BIN=$kvc KVC_GPUS_PER_TASK=0 \
  bash "$here/submit.sh" 3 --cpus-per-task=1)
echo "test-local: $jobs"
merge=$(echo "$jobs" | sed -n 's/.*merge \([0-9]*\).*/\1/p')
for _ in $(seq 1200); do
  squeue -h -j "$merge" 2>/dev/null | grep -q . || break
  sleep 1
done
squeue -h -j "$merge" 2>/dev/null | grep -q . && { echo "test-local: the merge job did not finish in 20 minutes" >&2; exit 1; }
cat "$work/sharded/kvc-merge-$merge.out"
ok=1
for f in scores.csv summary.csv $(cd "$work/one" && find . -name result.json); do
  if cmp -s "$work/one/$f" "$work/sharded/$f"; then echo "same: $f"; else echo "DIFFERENT: $f"; ok=0; fi
done
for t in "$work"/sharded/kvc-shard-*.out; do echo "== $(basename "$t")"; tail -n 3 "$t"; done
[[ $ok == 1 ]] && echo "test-local: the Slurm array's merged sweep equals the unsharded one"
[[ $ok == 1 ]]
