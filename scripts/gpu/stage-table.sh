#!/usr/bin/env bash
# Stage the RULER table's GPU run (scripts/gpu/kvpress-visit.sh, SKIP_SIDE=1) as parts that
# each fit one device call's carry (64 MiB with the working tree): one tar of the
# xz-compressed CUDA binary, the GGUF, RULER's sources and the results so far, split in
# parts .gpu/part-aa, -ab, ... (STAGE_PART_BYTES, 50 MB by default: the tracked tree is ~10 MB)
#   scripts/gpu/stage-table.sh [RESULTS.tar.gz]
# STAGE_EXTRA="f1 f2": more executables for the same lease (e.g. the cuda_kernels test binary of
# scripts/gpu/cuda-tests.sh build), stripped and xz-compressed as kvs/<name>.xz.
# STAGE_FILES="f1 d2": files or directories copied into kvs/ as they are (the side-by-side's
# pywhl/ and prompts.jsonl, kvpress-visit.sh).
# Needs the CUDA build (CARGO_TARGET_DIR=/work/target-cuda by default, see ../shared/gpu) and
# models/ (scripts/fetch-model.sh, scripts/fetch-ruler-sources.sh). RESULTS: an earlier call's
# $OUT/results.tar.gz, so the run resumes its rows. Prints the device calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${CARGO_TARGET_DIR:-/work/target-cuda}/release/kvc
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
for f in "$bin" "$gguf" models/ruler-sources; do
  [[ -e $f ]] || { echo "stage-table.sh: $f missing (CUDA build, fetch-model.sh, fetch-ruler-sources.sh)" >&2; exit 2; }
done
if [[ -n ${1:-} && ! -f $1 ]]; then
  echo "stage-table.sh: $1 is not a file (an earlier call's results.tar.gz)" >&2
  exit 2
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/kvs" .gpu
strip -o "$stage/kvs/kvc" "$bin"
xz -6 -T2 "$stage/kvs/kvc"
cp "$gguf" "$stage/kvs/model.gguf"
cp -r models/ruler-sources "$stage/kvs/"
if [[ -n ${1:-} ]]; then cp "$1" "$stage/kvs/results.tar.gz"; fi
for f in ${STAGE_FILES:-}; do cp -r "$f" "$stage/kvs/"; done
for f in ${STAGE_EXTRA:-}; do
  strip -o "$stage/kvs/${f##*/}" "$f" && xz -6 -T2 "$stage/kvs/${f##*/}"
done
rm -f .gpu/part-*
tar cf - -C "$stage" kvs | split -b ${STAGE_PART_BYTES:-50000000} - .gpu/part-
sha=$(sha256sum "$gguf" | cut -c1-16)
ls -la .gpu/part-*
parts=$(cd .gpu && ls part-* | sed 's|^|".gpu/|; s|$|"|' | paste -sd, -)
echo "one device call per part, back to back (the machine stays warm ~30 s), each carrying"
echo "its own part of [$parts] and running:"
echo "  mkdir -p /tmp/parts && cp .gpu/part-* /tmp/parts/"
echo "the last one then:"
echo "  cat /tmp/parts/part-* | tar xf - -C /tmp && xz -d /tmp/kvs/kvc.xz"
echo "  sha256sum /tmp/kvs/model.gguf | cut -c1-16   # want $sha"
echo "  SKIP_SIDE=1 TABLE_GROUPS='a;b;...' bash scripts/gpu/kvpress-visit.sh /tmp/kvs SECONDS"
echo "later calls (warm): the same kvpress-visit.sh line; each returns \$OUT/results.tar.gz,"
echo "the next stage's RESULTS."
