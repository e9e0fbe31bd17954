"""Write a random-weight checkpoint of a named architecture, laid out as the hub has it (bf16
safetensors sharded by save_pretrained, config.json, generation_config.json, tokenizer files),
on the GPU machine itself (an 8B checkpoint is 16 GB: write it there, never carry it).

    python3 scripts/gpu/make_checkpoint.py ARCH OUT_DIR [--rope-format v5|legacy]
        [--tokenizer-model PATH] [--tokenizer-dir DIR] [--layers N] [--seed S]
        [--fp8 row|tensor] [--device cuda|cpu]

ARCH: llama-3.1-8b | llama-3.1-70b | mistral-7b (Mistral-7B-Instruct-v0.2). The config values are
the hub's config.json of those models. --rope-format v5 (default) keeps what transformers >= 5
writes (`rope_parameters`); legacy rewrites config.json with top-level `rope_theta` +
`rope_scaling` as older checkpoints have it. --layers cuts the depth (for quick runs; say so
when reporting). Llama needs Meta's tiktoken `tokenizer.model` (scripts/fetch-llama3-tokenizer.sh):
it is converted to tokenizer.json by transformers' TikTokenConverter (needs the `tiktoken`
package) and tokenizer_config.json gets Llama-3.1-Instruct's chat template; the tiktoken file is
kept beside it; or --tokenizer-dir: a checkpoint this script wrote, whose tokenizer files are
copied (no tiktoken needed). Mistral takes --tokenizer-dir: the directory `scripts/fetch-mistral-tokenizer.sh`
writes (Mistral-7B's 32000-token SentencePiece model converted to tokenizer.json, with
Mistral-7B-Instruct-v0.2's chat template), copied in.
Weights are random (normal, initializer_range): outputs are noise, for parity/memory/speed only.
--fp8 writes the projections (q/k/v/o, gate/up/down) as float8 e4m3 with `<name>_scale` in f32,
one per output row (`row`: fbgemm_fp8, as Meta's FP8 checkpoints) or one per tensor (`tensor`:
compressed-tensors, as RedHat's / Neural Magic's), embeddings, norms and lm_head in bf16: tensor
by tensor, never the whole model in memory (70B: ~70 GB of files, ~2 GB at a time).
"""
import argparse
import json
import os
import shutil

import torch

LLAMA31_CHAT_TEMPLATE = open(os.path.join(os.path.dirname(__file__), "llama31_chat_template.jinja")).read()

LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
ARCHS = {
    "llama-3.1-8b": dict(LLAMA31, hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_hidden_layers=32),
    "llama-3.1-70b": dict(LLAMA31, hidden_size=8192, intermediate_size=28672,
                          num_attention_heads=64, num_hidden_layers=80),
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    },
}
GENERATION = {
    "llama": {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
              "temperature": 0.6, "top_p": 0.9},
    "mistral": {"bos_token_id": 1, "eos_token_id": 2},
}
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"] + [
    f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]


def write_llama_tokenizer(out, model_path):
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter
    shutil.copy(model_path, os.path.join(out, "tokenizer.model"))
    tok = TikTokenConverter(vocab_file=model_path, pattern=LLAMA3_PATTERN,
                            extra_special_tokens=LLAMA31_SPECIALS).converted()
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, 128000)])])
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA31_CHAT_TEMPLATE,
           "clean_up_tokenization_spaces": True, "model_max_length": 131072,
           "tokenizer_class": "PreTrainedTokenizerFast",
           "model_input_names": ["input_ids", "attention_mask"]}
    json.dump(cfg, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)


def quant_config(fp8):
    if fp8 == "row":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                "modules_to_not_convert": ["lm_head"]}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 8, "type": "float",
                                                      "strategy": "tensor", "symmetric": True}}}}


def fp8_tensors(hub, fp8, device, seed):
    """(name, tensor on the CPU) of an FP8 checkpoint, one at a time."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, voc = hub["hidden_size"], hub["intermediate_size"], hub["vocab_size"]
    q, kv = hub["num_attention_heads"], hub["num_key_value_heads"]
    d = h // q
    std = hub["initializer_range"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std

    def dense(shape):
        return rnd(*shape).to(torch.bfloat16).cpu()

    def quant(name, shape):
        w = rnd(*shape)
        amax = w.abs().amax(dim=1, keepdim=True) if fp8 == "row" else w.abs().amax().reshape(1)
        scale = (amax / 448.0).clamp(min=1e-12)
        w8 = (w / (scale if fp8 == "row" else scale.reshape(1, 1))).to(torch.float8_e4m3fn)
        return [(name, w8.cpu()), (name + "_scale", scale.cpu())]

    yield "model.embed_tokens.weight", dense((voc, h))
    for layer in range(hub["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for name, shape in [("self_attn.q_proj", (q * d, h)), ("self_attn.k_proj", (kv * d, h)),
                            ("self_attn.v_proj", (kv * d, h)), ("self_attn.o_proj", (h, q * d)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))]:
            yield from quant(f"{p}.{name}.weight", shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}.{norm}.weight", torch.ones(h, dtype=torch.bfloat16)
    yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
    if not hub["tie_word_embeddings"]:
        yield "lm_head.weight", dense((voc, h))


def write_fp8(out, hub, fp8, device, seed, shard_bytes=5 * 10**9):
    """Shards of at most `shard_bytes` (one in memory at a time), named and indexed as
    save_pretrained names them."""
    from safetensors.torch import save_file
    written, cur, size = [], {}, 0

    def flush():
        nonlocal cur, size
        save_file(cur, os.path.join(out, f"part-{len(written) + 1:05d}.safetensors"),
                  {"format": "pt"})
        written.append(list(cur))
        cur, size = {}, 0

    for name, t in fp8_tensors(hub, fp8, device, seed):
        n = t.numel() * t.element_size()
        if cur and size + n > shard_bytes:
            flush()
        cur[name] = t.contiguous()
        size += n
    if cur:
        flush()
    weight_map, total = {}, len(written)
    for i, names in enumerate(written, 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.rename(os.path.join(out, f"part-{i:05d}.safetensors"), os.path.join(out, final))
        weight_map.update({n: final for n in names})
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("out")
    ap.add_argument("--rope-format", choices=["v5", "legacy"], default="v5")
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", choices=["row", "tensor"])
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM
    hub = dict(ARCHS[a.arch])
    if a.layers:
        hub["num_hidden_layers"] = a.layers
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    config = AutoConfig.for_model(**hub)
    if a.fp8:
        write_fp8(a.out, hub, a.fp8, a.device, a.seed)
        cfg = config.to_dict()
        cfg["quantization_config"] = quant_config(a.fp8)
        json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    else:
        with torch.device(a.device):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        model.save_pretrained(a.out, max_shard_size="5GB")
    family = "mistral" if hub["model_type"] == "mistral" else "llama"
    json.dump(GENERATION[family], open(os.path.join(a.out, "generation_config.json"), "w"), indent=2)
    if a.rope_format == "legacy":
        legacy = dict(hub, quantization_config=quant_config(a.fp8)) if a.fp8 else hub
        json.dump(legacy, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    if family == "llama" and not a.tokenizer_dir:
        if not a.tokenizer_model:
            raise SystemExit("llama needs --tokenizer-model (Meta's tiktoken tokenizer.model) "
                             "or --tokenizer-dir (one written by this script)")
        write_llama_tokenizer(a.out, a.tokenizer_model)
    else:
        if not a.tokenizer_dir:
            raise SystemExit("mistral needs --tokenizer-dir (scripts/fetch-mistral-tokenizer.sh)")
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copy(os.path.join(a.tokenizer_dir, f), os.path.join(a.out, f))
    cfg = json.load(open(os.path.join(a.out, "config.json")))
    print(json.dumps({"out": a.out, "rope": {k: cfg.get(k) for k in
                      ("rope_parameters", "rope_theta", "rope_scaling")},
                      "files": sorted(os.listdir(a.out))}))


if __name__ == "__main__":
    main()
