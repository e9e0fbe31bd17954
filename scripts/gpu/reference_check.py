"""Re-derive transformers' greedy outputs for the SmolLM2 reference records (run on the GPU
machine, which has torch + transformers; needs the `gguf` wheel).

    python3 scripts/gpu/reference_check.py MODEL_DIR GGUF_NAME REFERENCE_JSONL OUT_JSONL

For every record: plain greedy `generate` from the recorded `prompt_ids` (f32, TF32 off), the
first-step top-5, and whether the recorded `output_ids` are reproduced. Prints a summary table.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, gguf_name, ref_path, out_path = sys.argv[1:5]
device = sys.argv[5] if len(sys.argv) > 5 else ("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_name)
model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name, torch_dtype=torch.float32).to(device).eval()
print("generation_config:", model.generation_config.to_json_string(use_diff=False).replace("\n", " ")[:800])
print("tokenizer add_bos:", getattr(tok, "add_bos_token", None), "bos:", tok.bos_token, tok.bos_token_id, "eos:", tok.eos_token, tok.eos_token_id)
rows = [json.loads(l) for l in open(ref_path) if l.strip()]
out = open(out_path, "w")
for r in rows:
    ids = torch.tensor([r["prompt_ids"]], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
        top = torch.topk(logits, 5)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                           max_new_tokens=r["max_new_tokens"], eos_token_id=2, pad_token_id=2)
    new = g[0, ids.shape[1]:].tolist()
    rec = {"name": r["name"], "plain_output_ids": new, "matches_recorded": new == r["output_ids"],
           "top5_ids": top.indices.tolist(), "top5_logits": [round(x, 5) for x in top.values.tolist()]}
    if r["kind"] == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": r["user"]}], add_generation_prompt=True, tokenize=False)
        rec["tok_chat_with_specials"] = tok(text)["input_ids"][:4]
        rec["tok_chat_no_specials_equal"] = tok(text, add_special_tokens=False)["input_ids"] == r["prompt_ids"]
    out.write(json.dumps(rec) + "\n")
    first_diff = next((i for i, (a, b) in enumerate(zip(new, r["output_ids"])) if a != b), None)
    print(f"{r['name'][:40]:40s} recorded_match={new == r['output_ids']} first_diff={first_diff} n={len(new)}")
