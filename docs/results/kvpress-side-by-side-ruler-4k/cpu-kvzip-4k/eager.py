# The model's own attention during KVzip's repeat pass (eager, one forward over context + repeat
# ids, no press), max over the repeat queries and each kv-head's query group, per layer; against
# kvpress's score_val (saved by layers.py) for the same prompt.
import json, sys, torch
from transformers import AutoTokenizer, AutoModelForCausalLM
p = json.loads(open("/tmp/kz4/p1.jsonl").readline())
ids = p["ids"] if "ids" in p else p["input_ids"]
ctx = ids[: len(ids) - p["question_tokens"]] if "question_tokens" in p else None
tok = AutoTokenizer.from_pretrained("models")
model = AutoModelForCausalLM.from_pretrained("models", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                             dtype=torch.float32, attn_implementation="eager").eval()
prefix = 36
q = tok.encode("\n\nRepeat the previous context exactly.", add_special_tokens=False)
suf = tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
rep = q + suf + ctx[prefix:]
x = torch.tensor([ctx + rep])
L = len(ctx)
maxima = {}
def keep(l):
    def hook(module, args, output):
        a = output[1][0, :, L:, prefix:L]  # [heads, repeat rows, context cols]
        g = a.shape[0] // 3
        maxima[l] = a.reshape(3, g, a.shape[1], a.shape[2]).amax(dim=(1, 2))  # [kv, ctx]
    return hook
for l, layer in enumerate(model.model.layers):
    layer.self_attn.register_forward_hook(keep(l))
with torch.no_grad():
    model(x)
kv = torch.load("/tmp/kz4/kvpress_scores.pt")
for l in range(len(maxima)):
    m = maxima[l]
    k = kv[l, 0, :, prefix:]
    print(l, "eager max", round(m.max().item(), 3), "median", round(m.median().item(), 5),
          "| kvpress max", round(k.max().item(), 3), "median", round(k.median().item(), 5), flush=True)
