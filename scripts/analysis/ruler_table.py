"""The RULER table of issue 28 as markdown: one row per method, one column per rate, for each
protocol (the question in the window, then `@context-only`), cells "% of full [95 % CI]" with
n where a run has fewer rows than the full cache (a partial run covers only the first subsets,
so its percentage is over another mix of tasks).

    python3 scripts/analysis/ruler_table.py TREE/summary.csv [TREE2/summary.csv ...] > table.md

TREE: a `kvc eval` / `kvc score` results tree (summary.csv, category `all`). With several trees
(runs of one table made in several device leases), a run of a later tree replaces an earlier
tree's run of the same method and rate when it has at least as many rows (a run with a percent
of full always beats one without: rows past its tree's full cache have none); each tree's
percentages are against its own full cache, and the full cache of every tree is printed.
"""
import collections
import csv
import sys

RATES = [2, 4, 8, 16, 32, 64]
ORDER = [
    "kvcompress", "snapkv", "pyramidkv", "ada-snapkv", "h2o", "tova", "knorm", "keydiff",
    "lagkv", "streamingllm", "random", "expected-attention", "snapkv+kvcrush",
    "snapkv+criticalkv", "snapkv+chunkkv", "kvzip",
]


def main(paths):
    by = collections.defaultdict(dict)
    fulls = []
    for path in paths:
        rows = [r for r in csv.DictReader(open(path)) if r["category"] == "all" and not r["bucket"]]
        for r in rows:
            rate = int(float(r["rate"]))
            old = by[r["method"]].get(rate)
            # The run with the most rows among those with a percent of full (a run past its
            # full cache's rows has none), then the most rows.
            rank = lambda x: (bool(x["percent_of_full"]), int(x["n"]))
            if old is None or rank(r) >= rank(old):
                by[r["method"]][rate] = r
        fulls += [(path, r) for r in rows if r["method"] == "full"]
    full = by["full"][1]
    for path, f in fulls:
        print(f"Full cache ({path}): score {float(f['score']):.2f} over n = {f['n']}.\n")
    protocols = [
        ("question in the window (LongBench's protocol)", ""),
        ("question-agnostic (kvpress's default: `@context-only`)", "@context-only"),
    ]
    for title, suffix in protocols:
        print(f"**{title}**: % of full [95 % paired-bootstrap CI]; n where below {full['n']}\n")
        print("| method | " + " | ".join(f"{r}x" for r in RATES) + " |")
        print("|---|" + "---|" * len(RATES))
        for m in ORDER:
            runs = by.get(m + suffix, {})
            print(f"| {m} | " + " | ".join(cell(runs.get(r), full["n"]) for r in RATES) + " |")
        print()


def cell(run, n_full):
    if not run:
        return "-"
    if not run["percent_of_full"]:
        # Rows past the full cache's (kvc score pairs each row with the full cache's).
        return f"- (n {run['n']}, past the full cache's rows)"
    c = (
        f"{float(run['percent_of_full']):.1f} [{float(run['percent_of_full_ci_low']):.1f}, "
        f"{float(run['percent_of_full_ci_high']):.1f}]"
    )
    return c if run["n"] == n_full else c + f" (n {run['n']})"


if __name__ == "__main__":
    main(sys.argv[1:])
