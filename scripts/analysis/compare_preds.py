#!/usr/bin/env python3
"""Count identical predictions between two `kvc eval` result trees (A/B of two runs).

    python3 scripts/analysis/compare_preds.py RESULTS_A/MODEL RESULTS_B/MODEL

For every `<method>/<budget>/preds/<subset>.jsonl` under A that B also has, prints how many
rows (matched by `_id`) have the same `pred`, then the total.
"""
import glob
import json
import os
import sys


def rows(path):
    with open(path) as f:
        return {r["_id"]: r for r in map(json.loads, f)}


def main(a, b):
    tot = same = 0
    for fa in sorted(glob.glob(os.path.join(a, "**", "preds", "*.jsonl"), recursive=True)):
        rel = os.path.relpath(fa, a)
        fb = os.path.join(b, rel)
        if not os.path.exists(fb):
            print(f"{rel}: not in {b}")
            continue
        ra, rb = rows(fa), rows(fb)
        common = [k for k in ra if k in rb]
        s = sum(ra[k]["pred"] == rb[k]["pred"] for k in common)
        tot += len(common)
        same += s
        print(f"{rel} {s}/{len(common)}")
    print(f"TOTAL {same}/{tot}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
