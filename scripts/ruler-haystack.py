#!/usr/bin/env python3
"""Rebuild datasets/ruler/multi_news_haystack.txt, the real-text haystack of `kvc eval --tasks ruler`.

Input: the official LongBench multi_news.jsonl (sha256 5e79ca4f...af1ad). Output: the `context`
of its first 20 rows, one passage per line, with LongBench's `NEWLINE_CHAR` markers and the
`Passage N:` headers removed and whitespace collapsed. kvc embeds the file at build time, so the
suite needs no download.

usage: python3 scripts/ruler-haystack.py /path/to/multi_news.jsonl > datasets/ruler/multi_news_haystack.txt
"""
import json
import re
import sys

rows = 20
out = []
with open(sys.argv[1], encoding="utf-8") as f:
    for i, line in enumerate(f):
        if i >= rows:
            break
        ctx = json.loads(line)["context"].replace("NEWLINE_CHAR", " ")
        for passage in re.split(r"Passage \d+:", ctx):
            text = " ".join(passage.split())
            if text:
                out.append(text)
sys.stdout.write("\n".join(out) + "\n")
