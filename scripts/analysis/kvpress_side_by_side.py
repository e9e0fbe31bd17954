"""The kvc / kvpress side-by-side table (issue 28): both results trees scored by `kvc score`
(the same metric code), one row per method and rate, and the two tools' times.

    python3 scripts/analysis/kvpress_side_by_side.py KVC_TREE KVPRESS_TREE [--kvc-wall S]

KVC_TREE: `kvc eval ... --question-in-window no --out KVC_TREE` (summary.csv written);
KVPRESS_TREE: scripts/gpu/kvpress_side_by_side.py's OUT after `kvc score KVPRESS_TREE`
(summary.csv; times.json holds kvpress's generation seconds per run). --kvc-wall: kvc's wall
seconds for the same table (its whole `kvc eval`, model load included), from the visit log.
Per run it also counts the predictions identical between the tools (same ids, same greedy
decoding: the full cache's row checks that both ran the same prompts and model).
"""
import argparse
import csv
import glob
import json
import os


def summary(tree):
    rows = {}
    for r in csv.DictReader(open(os.path.join(tree, "summary.csv"))):
        if r["category"] == "all" and not r["bucket"]:
            rows[(r["method"], r["budget"])] = r
    return rows


def preds(tree, run):
    out = {}
    for f in glob.glob(os.path.join(tree, "*", run, "preds", "*.jsonl")):
        for line in open(f):
            r = json.loads(line)
            out[r["_id"]] = r["pred"]
    return out


def cell(r):
    if r is None:
        return "-"
    pct = r["percent_of_full"]
    lo, hi = r["percent_of_full_ci_low"], r["percent_of_full_ci_high"]
    if not pct:
        return f"{float(r['score']):.1f}"
    ci = f" [{float(lo):.0f}, {float(hi):.0f}]" if lo else ""
    return f"{float(pct):.1f}{ci}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kvc")
    ap.add_argument("kvpress")
    ap.add_argument("--kvc-wall", type=float)
    a = ap.parse_args()
    k, p = summary(a.kvc), summary(a.kvpress)
    times = json.load(open(os.path.join(a.kvpress, "times.json")))
    keys = sorted(set(k) | set(p), key=lambda x: (x[0] != "full", x[0], float(x[1][4:])))
    print(
        "| run | ratio | n | kvc % of full [95% CI] | kvpress % of full [95% CI] "
        "| identical predictions | kvpress s |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        kr, pr = k.get(key), p.get(key)
        any_r = kr or pr
        run = f"{key[0]}/{key[1]}"
        n = f"{kr['n'] if kr else '-'} / {pr['n'] if pr else '-'}"
        t = times.get(run)
        secs = f"{t:.1f}" if t is not None else "-"
        ratio = float(any_r["compression_ratio"])
        if key[0] == "full":  # the baseline: its score, not 100 %
            kc, pc = (f"score {float(r['score']):.2f}" if r else "-" for r in (kr, pr))
        else:
            kc, pc = cell(kr), cell(pr)
        kp, pp = preds(a.kvc, run), preds(a.kvpress, run)
        both = set(kp) & set(pp)
        same = f"{sum(kp[i] == pp[i] for i in both)} / {len(both)}"
        print(f"| {run} | {ratio:.4g} | {n} | {kc} | {pc} | {same} | {secs} |")
    print()
    total = sum(v for r, v in times.items() if not r.startswith("_"))
    line = f"kvpress generation time for the table: {total:.1f} s"
    if a.kvc_wall:
        line += f"; kvc's whole `kvc eval` for it: {a.kvc_wall:.1f} s ({total / a.kvc_wall:.1f}x)"
    print(line)
    if "_versions" in times:
        print("kvpress side:", json.dumps(times["_versions"]))


if __name__ == "__main__":
    main()
