#!/usr/bin/env python3
"""Where a `kvc eval` sweep's time went, from its per-row timings (GPU runs).

    python3 scripts/analysis/decode_breakdown.py RESULTS/MODEL [RESULTS/MODEL ...]

Per subset of kvcompress/rate2 (every row of a shared-prefill sweep carries its batch's decode
timings): the per-step means of the decode parts (`decode_times`: host forward, wait for the
device, compression, sampling) and the summed prefill parts; then the decode walls per subset,
the longest `decode_ms` of each batch of `--batch-samples` rows (BATCH, default 32), summed.
"""
import json
import os
import sys

TASKS = ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]
BATCH = int(os.environ.get("BATCH", "32"))


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def main(roots):
    for root in roots:
        print(root)
        total = 0.0
        for task in TASKS:
            rows = load(os.path.join(root, "kvcompress/rate2/preds", task + ".jsonl"))
            steps = sum(r["decode_times"]["steps"] for r in rows)
            keys = ["forward_ms", "sync_ms", "compress_ms", "sample_ms", "observe_ms"]
            per_step = {k: round(sum(r["decode_times"].get(k, 0) for r in rows) / steps, 2) for k in keys}
            prefill = {k: round(sum(r["prefill_times"][k] for r in rows) / 1000, 1) for k in rows[0]["prefill_times"]}
            order = [r["_id"] for r in load(os.path.join(root, "full/rate1/preds", task + ".jsonl"))]
            batch_of = {i: n // BATCH for n, i in enumerate(order)}
            walls = {}
            for run in sorted(os.listdir(os.path.join(root, "kvcompress"))) + ["../full/rate1"]:
                for r in load(os.path.join(root, "kvcompress", run, "preds", task + ".jsonl")):
                    b = batch_of[r["_id"]]
                    walls[b] = max(walls.get(b, 0.0), r["decode_ms"])
            wall = sum(walls.values()) / 1000
            total += wall
            print(f"  {task}: per step ms {per_step}; prefill s (summed) {prefill}; decode walls {wall:.1f} s")
        print(f"  decode walls, all subsets: {total:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
