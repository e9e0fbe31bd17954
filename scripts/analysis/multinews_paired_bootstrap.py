#!/usr/bin/env python3
# Usage: .venv-conformance/bin/python scripts/analysis/multinews_paired_bootstrap.py RESULTS/<model>
# (scripts/conformance-venv.sh makes the venv with LongBench's pinned rouge).
# Per-sample LongBench multi_news scores (rouge-L F, LongBench's rouge_score) and paired
# bootstrap of (method - kvcompress) at each rate, in percent of the full-cache mean.
import json, sys, random, glob, os
from rouge import Rouge
root = sys.argv[1]
R = Rouge()
def score(pred, answers):
    best = 0.0
    for a in answers:
        try:
            s = R.get_scores([pred], [a], avg=True)["rouge-l"]["f"]
        except Exception:
            s = 0.0
        best = max(best, s)
    return best * 100
def load(run):
    f = os.path.join(root, run, "preds", "multi_news.jsonl")
    out = {}
    for line in open(f):
        d = json.loads(line)
        out[d["_id"]] = score(d["pred"], d["answers"])
    return out
full = load("full/rate1")
ids = sorted(full)
fm = sum(full.values()) / len(ids)
methods = ["kvcompress", "snapkv", "pyramidkv", "streamingllm", "h2o", "ada-snapkv", "kvcompress+kvcrush", "snapkv+kvcrush"]
rates = [2, 4, 8, 16, 32, 64]
S = {(m, r): load(f"{m}/rate{r}") for m in methods for r in rates}
random.seed(0)
B = 4000
print("full mean %.2f over %d rows" % (fm, len(ids)))
print("| rate | " + " | ".join(methods[1:]) + " |")
for r in rates:
    base = S[("kvcompress", r)]
    cells = []
    for m in methods[1:]:
        d = [S[(m, r)][i] - base[i] for i in ids]
        mean = sum(d) / len(d) / fm * 100
        bs = []
        for _ in range(B):
            smp = [d[random.randrange(len(d))] for _ in d]
            bs.append(sum(smp) / len(smp) / fm * 100)
        bs.sort()
        lo, hi = bs[int(0.025 * B)], bs[int(0.975 * B)]
        cells.append("%+.1f [%+.1f, %+.1f]" % (mean, lo, hi))
    print(f"| {r}x | " + " | ".join(cells) + " |")
print()
print("per-method % of full (check against summary):", {f"{m}@{r}": round(sum(S[(m,r)].values())/len(ids)/fm*100,1) for m in ["kvcompress","h2o"] for r in rates})
