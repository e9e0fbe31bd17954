"""transformers' greedy reference on a checkpoint, in the format `kvc conformance` replays
(tests/data/smollm2_greedy.README.md): chat prompts of about the given token counts, built from
LongBench multi_news contexts, through the checkpoint's chat template.

    python3 scripts/gpu/llama_reference.py CKPT DATA_JSONL OUT_DIR --tokens 3000,30000
        [--dtype float32|bfloat16] [--new 12]

Writes OUT_DIR/reference-<dtype>.jsonl (name, kind, user, prompt_ids, output_ids,
first_step_top5_ids/logits, max_new_tokens) and OUT_DIR/rederived-<dtype>.jsonl (name,
plain_output_ids, the top-2 margin of every step: where a divergence is a near-tie).
f32 runs with TF32 off; attention is SDPA. The prompt is prefilled in chunks of --chunk tokens
through transformers' DynamicCache (one f32 SDPA over a 30k-token prompt asks for ~108 GB), then
greedy steps take the first maximum, as `generate` does.
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


def user_texts(tok, data_path, targets):
    """A user message per target token count: multi_news contexts joined until long enough,
    then cut to the target (by tokens, decoded back to text)."""
    rows = [json.loads(line) for line in open(data_path)]
    out = []
    for target in targets:
        text, ids = "", []
        for r in rows:
            text += r["context"] + "\n\n"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= target:
                break
        out.append(tok.decode(ids[:target]) + "\n\nSummarize the news above in one sentence.")
    return out


def greedy(model, ids, new, stop, chunk):
    """Chunked prefill, then `new` greedy steps (stopping on `stop`): (tokens, step logits)."""
    past = DynamicCache()
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            out = model(input_ids=x[:, s:s + chunk], past_key_values=past, use_cache=True)
            past = out.past_key_values
        logits = out.logits[0, -1].float()
        toks, scores = [], []
        for _ in range(new):
            scores.append(logits)
            t = int(torch.argmax(logits))
            toks.append(t)
            if t in stop:
                break
            out = model(input_ids=torch.tensor([[t]], device="cuda"), past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
    return toks, scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--tokens", default="3000,30000")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=1024)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = getattr(torch, a.dtype)
    tok = AutoTokenizer.from_pretrained(a.ckpt)
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=dtype, attn_implementation="sdpa").to("cuda").eval()
    stop = model.generation_config.eos_token_id
    os.makedirs(a.out, exist_ok=True)
    short = {"float32": "f32", "bfloat16": "bf16"}.get(a.dtype, a.dtype)
    paths = [os.path.join(a.out, f"{kind}-{short}.jsonl") for kind in ("reference", "rederived")]
    ref, red = (open(p + ".part", "w") for p in paths)
    for target, user in zip([int(t) for t in a.tokens.split(",")], user_texts(tok, a.data, [int(t) for t in a.tokens.split(",")])):
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t0 = time.time()
        stops = stop if isinstance(stop, list) else [stop]
        new, scores = greedy(model, ids, a.new, set(stops), a.chunk)
        dt = time.time() - t0
        top = torch.topk(scores[0], 5)
        margins = []
        for s in scores:
            t2 = torch.topk(s, 2).values
            margins.append(float(t2[0] - t2[1]))
        name = f"chat-{target // 1000}k"
        ref.write(json.dumps({"name": name, "kind": "chat", "user": user, "prompt_ids": ids,
                              "output_ids": new, "first_step_top5_ids": top.indices.tolist(),
                              "first_step_top5_logits": top.values.tolist(),
                              "max_new_tokens": a.new}) + "\n")
        red.write(json.dumps({"name": name, "plain_output_ids": new, "top2_margins": margins}) + "\n")
        print(f"{name}: {len(ids)} prompt tokens, {a.dtype}, {dt:.1f} s, output {new}, "
              f"min top-2 margin {min(margins):.3g}", flush=True)
    ref.close()
    red.close()
    for p in paths:  # complete files only: a rerun redoes an interrupted reference
        os.replace(p + ".part", p)


if __name__ == "__main__":
    main()
