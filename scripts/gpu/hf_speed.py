"""transformers' prefill and single-sequence decode speed on a checkpoint, measured as
`kvc bench-model` measures kvc's (the peer's row beside it, same card, same lease): a
pseudo-random prompt of each length prefilled in one forward (SDPA), then --decode-tokens greedy
steps through DynamicCache ignoring stop tokens; decode tokens/s counts the steps after the
first token. One warm-up generation first; the median of --repeats.

    python3 scripts/gpu/hf_speed.py CKPT --prompt-lens 4000,32000 [--dtype bfloat16]
        [--decode-tokens 128] [--repeats 3] [--csv OUT.csv]
"""
import argparse
import csv
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache


def once(model, ids, new):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        past = DynamicCache()
        out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(new - 1):
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--prompt-lens", default="4000,32000")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--csv")
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(
        a.ckpt, dtype=getattr(torch, a.dtype), attn_implementation="sdpa").to("cuda").eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    once(model, torch.randint(0, vocab, (1, 64), generator=g).cuda(), 4)
    rows = []
    for n in [int(x) for x in a.prompt_lens.split(",")]:
        ids = torch.randint(0, vocab, (1, n), generator=g).cuda()
        runs = [once(model, ids, a.decode_tokens) for _ in range(a.repeats)]
        pre = statistics.median(r[0] for r in runs)
        dec = statistics.median(r[1] for r in runs)
        rows.append({"peer": "transformers", "dtype": a.dtype, "prompt_tokens": n,
                     "decode_tokens": a.decode_tokens, "prefill_ms": round(pre * 1e3, 1),
                     "prefill_tokens_per_s": round(n / pre, 1), "decode_ms": round(dec * 1e3, 1),
                     "decode_tokens_per_s": round((a.decode_tokens - 1) / dec, 1)})
        print(rows[-1], flush=True)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
