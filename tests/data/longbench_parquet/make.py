"""Writes the parquet fixture of tests/eval_data.rs from the bundled official LongBench rows,
the way Hugging Face mirrors store LongBench (pyarrow, snappy, data/<subset>/test-*.parquet).
Run: python3 -m venv /tmp/pa && /tmp/pa/bin/pip install pyarrow==26.0.1 &&
     /tmp/pa/bin/python tests/data/longbench_parquet/make.py"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "..", "..", "..", "datasets", "longbench", "sample")
for subset in ["multi_news", "multifieldqa_zh"]:
    with open(os.path.join(src, f"{subset}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    schema = pa.schema(
        [
            ("input", pa.string()),
            ("context", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("length", pa.int64()),
            ("dataset", pa.string()),
            ("language", pa.string()),
            ("all_classes", pa.list_(pa.string())),
            ("_id", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    out = os.path.join(here, "data", subset)
    os.makedirs(out, exist_ok=True)
    pq.write_table(table, os.path.join(out, "test-00000-of-00001.parquet"), compression="snappy")
    print(subset, len(rows))
