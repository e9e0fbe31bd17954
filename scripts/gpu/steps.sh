#!/usr/bin/env bash
# Short GPU-machine steps that are not a resumable sweep (those are eval-sweep.sh and
# bench.sh). Run after unpack.sh put the staged files under /tmp/kvc/:
#   bash scripts/gpu/steps.sh STEP [STEP...]
# Each step writes its log and a tarball of its results under $OUT/<step>/ and prints a short
# summary; a step's time limit (seconds) can be set with <STEP>_S, e.g. RULER_FULL_S=240.
#   info        GPU, driver, whether nsys is installed
#   ruler-full  full-cache RULER table, all 11 tasks at 1k/2k/4k/8k, 4 samples each (issue 8)
#   ab-shared   the same kvcompress sweep (multi_news, first 2 rows, rates 2..64) with the shared
#               prefill + batched decode and with --no-shared-prefill: wall time of each and
#               whether the predictions agree (issue 6)
#   ab-compress KV-Compress with --compress-on host and auto (device) on the 3 subsets (8 rows,
#               rates 2..64, --batch-samples 8): wall time, identical predictions, and the
#               per-step decode_times of each (issue 6)
#   ncu-prefill per-kernel GPU time of one 4000-token bench-model prefill (ncu), summed by kernel
#   profile     nsys profile of a short `kvc bench` at 2000 tokens (rate 1 and 16): kernel,
#               memcpy and CUDA API summaries (issue 7), when nsys exists there
set -uo pipefail
KVC=${KVC:-/tmp/kvc/target/gpu-stage/kvc-gpu}
MODEL=${MODEL:-/tmp/kvc/models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-/tmp/kvc/.gpu-ref/longbench}
OUT=${OUT:-gpu-out}

step_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
  command -v nsys || ls /usr/local/cuda/bin | grep -i -E 'nsys|ncu' || echo "no nsys"
  ls -d /opt/nvidia/nsight* /usr/local/cuda/nsight* 2>/dev/null || true
}

step_ruler_full() {
  local o=$OUT/ruler-full res=/tmp/kvc/ruler-full
  mkdir -p "$o"
  /usr/bin/time -f "ruler-full wall %e s" timeout --foreground -s INT "${RULER_FULL_S:-240}" \
    "$KVC" eval --model "$MODEL" --tasks ruler --lengths 1024,2048,4096,8192 --ruler-samples 4 \
    --methods full --device cuda:0 --out "$res" --no-progress > "$o/eval.log" 2>&1
  echo "ruler-full rc=$?"
  tar -czf "$o/results.tgz" -C /tmp/kvc ruler-full
  tail -n 8 "$o/eval.log"
}

step_ab_shared() {
  local o=$OUT/ab-shared
  mkdir -p "$o"
  local common=(eval --model "$MODEL" --data-dir "$DATA" --tasks multi_news --limit 2
    --methods kvcompress --rates 2,4,8,16,32,64 --device cuda:0 --no-progress)
  for mode in shared separate; do
    local extra=(--batch-samples 2)
    [ "$mode" = separate ] && extra=(--no-shared-prefill)
    local s=$SECONDS
    timeout --foreground -s INT "${AB_SHARED_S:-150}" "$KVC" "${common[@]}" "${extra[@]}" \
      --out "/tmp/kvc/ab/$mode" > "$o/$mode.log" 2>&1
    echo "ab-shared $mode rc=$? wall $((SECONDS - s)) s"
  done
  tar -czf "$o/results.tgz" -C /tmp/kvc ab
  # Predictions of the two modes, run by run.
  python3 - <<'PY'
import json, pathlib
root = pathlib.Path("/tmp/kvc/ab")
for f in sorted((root / "shared").rglob("preds/*.jsonl")):
    g = root / "separate" / f.relative_to(root / "shared")
    a = {r["_id"]: r for r in map(json.loads, f.read_text().splitlines())}
    b = {r["_id"]: r for r in map(json.loads, g.read_text().splitlines())} if g.exists() else {}
    same = sum(1 for k in a if k in b and a[k].get("pred") == b[k].get("pred"))
    print(f"{f.relative_to(root / 'shared')}: {same}/{len(a)} predictions identical")
PY
}

step_ab_compress() {
  local o=$OUT/ab-compress
  mkdir -p "$o"
  for mode in auto host; do
    local s=$SECONDS
    timeout --foreground -s INT "${AB_COMPRESS_S:-200}" "$KVC" eval --model "$MODEL" \
      --data-dir "$DATA" --limit 8 --methods kvcompress --rates 2,4,8,16,32,64 \
      --batch-samples 8 --compress-on "$mode" --device cuda:0 --no-progress \
      --out "/tmp/kvc/ab-compress/$mode" > "$o/$mode.log" 2>&1
    echo "ab-compress $mode rc=$? wall $((SECONDS - s)) s"
  done
  tar -czf "$o/results.tgz" -C /tmp/kvc ab-compress
  python3 - <<'PY' | tee "$o/summary.txt"
import json, pathlib, collections
root = pathlib.Path("/tmp/kvc/ab-compress")
same = total = 0
for f in sorted((root / "auto").rglob("kvcompress/*/preds/*.jsonl")):
    g = root / "host" / f.relative_to(root / "auto")
    a = [json.loads(l)["pred"] for l in f.read_text().splitlines()]
    b = [json.loads(l)["pred"] for l in g.read_text().splitlines()] if g.exists() else []
    total += len(a); same += sum(x == y for x, y in zip(a, b))
print(f"identical predictions: {same}/{total}")
print("mode task rows: per step ms forward sync observe compress sample")
for mode in ("auto", "host"):
    acc = collections.defaultdict(collections.Counter)
    for f in (root / mode).rglob("kvcompress/*/preds/*.jsonl"):
        for l in f.read_text().splitlines():
            r = json.loads(l); c = acc[f.stem]; c["rows"] += 1
            for k, v in (r.get("decode_times") or {}).items(): c[k] += v
    for task, c in sorted(acc.items()):
        st = c["steps"] or 1
        print(mode, task, c["rows"], *(f"{c[k] / st:.1f}" for k in
              ("forward_ms", "sync_ms", "observe_ms", "compress_ms", "sample_ms")))
PY
}

step_profile() {
  local o=$OUT/profile nsys
  mkdir -p "$o"
  nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  [ -n "$nsys" ] || { echo "profile: no nsys on this machine"; return; }
  for r in 1 16; do
    timeout --foreground "${PROFILE_S:-120}" "$nsys" profile -o "/tmp/kvc/prof-r$r" --force-overwrite true \
      --trace cuda "$KVC" bench --model "$MODEL" --device cuda:0 --rates "$r" --input-lens 2000 \
      --output-len 100 --num-prompts 32 --kv-memory 1GiB --out "/tmp/kvc/prof-bench-r$r" \
      --no-progress --no-decode-metric > "$o/bench-r$r.log" 2>&1
    echo "profile rate $r rc=$?"
    "$nsys" stats --force-export true --report cuda_gpu_kern_sum,cuda_gpu_mem_time_sum,cuda_api_sum \
      --format csv --output "$o/r$r" "/tmp/kvc/prof-r$r.nsys-rep" > /dev/null 2>&1
    head -n 12 "$o"/r"$r"_cuda_api_sum.csv 2>/dev/null | cut -c1-160
  done
}

step_ncu_prefill() {
  # Per-kernel GPU time of a prefill (ncu, one metric: each kernel timed alone, serialised):
  # which kernels a 4000-token SmolLM2 prefill spends its time in.
  local o=$OUT/ncu-prefill ncu
  mkdir -p "$o"
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "ncu-prefill: no ncu on this machine"; return; }
  timeout --foreground "${NCU_PREFILL_S:-150}" "$ncu" --metrics gpu__time_duration.sum --csv \
    --log-file "$o/ncu.csv" "$KVC" bench-model --model "$MODEL" --device cuda:0 \
    --prompt-lens "${NCU_LEN:-4000}" --decode-tokens 4 --repeats 1 > "$o/bench-model.log" 2>&1
  echo "ncu-prefill rc=$?"
  python3 - "$o/ncu.csv" <<'PY' | tee "$o/summary.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    print("no ncu rows"); sys.exit()
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    v *= {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0,
          "s": 1e3, "second": 1e3}.get(r[ui], 1.0)
    name = r[ki].split("(")[0][:70]; tot[name] += v; cnt[name] += 1
all_ms = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {all_ms:.1f} ms of GPU time (prefill + 4 decode steps)")
for k, v in sorted(tot.items(), key=lambda x: -x[1])[:25]:
    print(f"{v:9.2f} ms {100*v/all_ms:5.1f}% {cnt[k]:6d}x  {k}")
PY
}

[ $# -ge 1 ] || { sed -n 2,16p "$0"; exit 2; }
for s in "$@"; do
  echo "== $s"
  "step_${s//-/_}"
done
