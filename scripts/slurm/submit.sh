#!/usr/bin/env bash
# Submit a kvc sweep to Slurm as an N-task job array (one shard per task) and a merge job that
# runs after it:
#   KVC_OUT=/shared/results KVC_ARGS="-m llama-3.1-8b --data-dir hub" \
#     bash scripts/slurm/submit.sh N [extra sbatch options, e.g. --partition=gpu --time=24:00:00]
# KVC_GPUS_PER_TASK (default 1; 0 for CPU partitions) adds --gres=gpu:<n> to the array tasks.
# Prints the two job ids; `squeue -u $USER` follows them, KVC_OUT/scores.csv is the result.
set -euo pipefail
n=${1:?usage: submit.sh N [sbatch options]}; shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: N must be a positive integer, got $n" >&2; exit 2; }
: "${KVC_OUT:?set KVC_OUT to a results directory on shared storage}"
here=$(cd "$(dirname "$0")" && pwd)
gpus=${KVC_GPUS_PER_TASK:-1}
gres=()
[[ $gpus == 0 ]] || gres=(--gres="gpu:$gpus")
mkdir -p "$KVC_OUT"
array=$(sbatch --parsable --array="0-$((n - 1))" "${gres[@]}" --chdir="$KVC_OUT" "$@" "$here/kvc-array.sbatch")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterany:$array" --chdir="$KVC_OUT" "$@" "$here/merge.sbatch")
echo "array $array ($n shards), merge $merge (after the array)"
