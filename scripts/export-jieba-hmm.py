#!/usr/bin/env python3
"""Regenerate datasets/jieba/hmm_python_0.42.1.model: Python jieba 0.42.1's finalseg HMM tables
(prob_start, prob_trans, prob_emit) at full float precision, in jieba-rs's hmm.model format
(states 0:B 1:E 2:M 3:S; missing transitions as -3.14e100, like finalseg's MIN_FLOAT).
Run with the conformance venv's python: .venv-conformance/bin/python scripts/export-jieba-hmm.py
"""
import os

import jieba
from jieba.finalseg import prob_emit as pe
from jieba.finalseg import prob_start as ps
from jieba.finalseg import prob_trans as pt

assert jieba.__version__ == "0.42.1", jieba.__version__
S = "BEMS"
MIN = -3.14e100
out = [
    "# Python jieba 0.42.1 finalseg HMM tables (prob_start.py, prob_trans.py, prob_emit.py),",
    "# exported at full float precision in jieba-rs's hmm.model format, states 0:B 1:E 2:M 3:S.",
    "# jieba is MIT licensed (Copyright (c) 2013 Sun Junyi). Exported by kvc for exact segmentation.",
    " ".join(repr(ps.P[s]) for s in S),
]
for a in S:
    out.append(" ".join(repr(pt.P[a].get(b, MIN)) for b in S))
for s in S:
    out.append(",".join(f"{c}:{p!r}" for c, p in pe.P[s].items()))
path = os.path.join(os.path.dirname(__file__), "..", "datasets", "jieba", "hmm_python_0.42.1.model")
with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
