"""Time Hugging Face transformers `generate` on the prompts of kvc's LongBench sweep, on the GPU
machine (PyTorch + transformers there; carry the `gguf` wheel: `pip download --no-deps gguf`).

    python3 scripts/gpu/transformers_sweep.py MODEL_DIR GGUF_NAME DATA_DIR OUT_JSONL \
        [--n 64] [--batch 32] [--batch1 1] [--max-input 7500] [--tasks a,b,c]

Prompts are built the way kvc and LongBench's pred.py build them: the subset's template from
DATA_DIR/config/dataset2prompt.json filled with the row, middle truncation to --max-input
tokens, the model's chat template; greedy decoding, new tokens from dataset2maxlen.json,
stopping at <|im_end|>. Per subset: the first --n rows in batches of --batch (left padding,
bf16, SDPA), then the first --batch1 rows one at a time. Every generate call is timed alone
(CUDA synchronised) after one warm-up call; one JSON line per call goes to OUT_JSONL
(prompt lengths, new tokens, steps, wall seconds). A table is printed last.

This is the comparison of issue 6 ("the same sweep with transformers on the same GPU"); the
sweep's transformers time is extrapolated from these calls in
docs/findings/2026-12-02-sweep-349-s-and-transformers-measured.md.
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("gguf_name")
ap.add_argument("data_dir")
ap.add_argument("out")
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--batch1", type=int, default=1)
ap.add_argument("--max-input", type=int, default=7500)
ap.add_argument("--tasks", default="multi_news,multifieldqa_zh,passage_retrieval_zh")
args = ap.parse_args()

dev = "cuda"
tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_name)
tok.padding_side = "left"
im_end = tok.convert_tokens_to_ids("<|im_end|>")
if tok.pad_token is None:  # the GGUF tokenizer has none; padding is masked anyway
    tok.pad_token = "<|im_end|>"
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(
    args.model_dir, gguf_file=args.gguf_name, dtype=torch.bfloat16, attn_implementation="sdpa"
).to(dev).eval()
print(f"model loaded in {time.time() - t0:.1f} s; transformers {__import__('transformers').__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
cfg = args.data_dir + "/config/"
templates = json.load(open(cfg + "dataset2prompt.json"))
maxlen = json.load(open(cfg + "dataset2maxlen.json"))


def prompt_ids(row, task):
    text = templates[task].format(**row)
    ids = tok(text, add_special_tokens=True).input_ids
    if len(ids) > args.max_input:  # pred.py's middle truncation
        half = args.max_input // 2
        text = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(chat, add_special_tokens=False).input_ids


def generate(batch_ids, new_tokens):
    enc = tok.pad({"input_ids": batch_ids}, return_tensors="pt").to(dev)
    torch.cuda.synchronize()
    t = time.time()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=im_end,
                             pad_token_id=im_end)
    torch.cuda.synchronize()
    wall = time.time() - t
    gen = out[:, enc.input_ids.shape[1]:]
    # New tokens per row: up to and including the first <|im_end|> (what kvc counts).
    n_new = []
    for r in gen.tolist():
        n_new.append(r.index(im_end) + 1 if im_end in r else len(r))
    return wall, n_new, gen.shape[1]


out = open(args.out, "w")
generate([prompt_ids({"context": "warm up " * 50, "input": "x"}, "passage_retrieval_zh")], 8)
rows_summary = []
for task in args.tasks.split(","):
    rows = [json.loads(l) for _, l in zip(range(args.n), open(f"{args.data_dir}/{task}.jsonl"))]
    ids = [prompt_ids(r, task) for r in rows]
    for bs, take in ((args.batch, len(ids)), (1, min(args.batch1, len(ids)))):
        for i in range(0, take, bs):
            chunk = ids[i:i + bs]
            try:
                wall, n_new, steps = generate(chunk, maxlen[task])
                err = None
            except torch.cuda.OutOfMemoryError as e:
                wall, n_new, steps, err = 0.0, [], 0, f"out of memory: {e}"
                torch.cuda.empty_cache()
            rec = {"task": task, "batch": bs, "first_row": i, "rows": len(chunk),
                   "prompt_tokens": [len(x) for x in chunk], "new_tokens": n_new, "steps": steps,
                   "wall_s": wall, "error": err}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            rows_summary.append(rec)
            print(f"{task:22} batch {bs:3} rows {i:3}..{i + len(chunk):3}: {wall:7.1f} s, "
                  f"{sum(n_new):6} new tokens in {steps} steps, {sum(n_new) / max(wall, 1e-9):7.1f} tok/s"
                  + (f"  ERROR {err}" if err else ""), flush=True)

print("\ntask                   batch  calls  rows    wall_s  new_tok  tok/s  s/row")
for task in args.tasks.split(","):
    for bs in (args.batch, 1):
        rs = [r for r in rows_summary if r["task"] == task and r["batch"] == bs and not r["error"]]
        if not rs:
            continue
        w = sum(r["wall_s"] for r in rs)
        n = sum(r["rows"] for r in rs)
        g = sum(sum(r["new_tokens"]) for r in rs)
        print(f"{task:22} {bs:5} {len(rs):6} {n:5} {w:9.1f} {g:8} {g / w:6.1f} {w / n:6.2f}")
