"""Run NVIDIA kvpress (pinned, on transformers) on the very prompts kvc runs, and write its
predictions as a kvc results tree, so `kvc score` scores both with the same metric code.

    python3 scripts/gpu/kvpress_side_by_side.py MODEL_DIR GGUF_NAME PROMPTS OUT \
        [--methods snapkv,tova,...] [--rates 2,4,8,16,32,64] [--per-task N] [--deadline SECONDS]

PROMPTS: `kvc eval ... --export-prompts PROMPTS` (token ids, the question split, greedy
settings, answers). Per prompt, as kvpress's pipeline does in its default (question-agnostic)
protocol: the context ids (`ids[:-question_tokens]`) are prefilled with the press, which
compresses them to a fraction 1 - 1/rate; the question ids (the question, the chat template's
tail, the answer prefix) are read into the compressed cache at their true positions; greedy
decoding stops at the exported stop ids or after max_new_tokens. kvpress's own preprocessing
(its chat template split) is bypassed so both tools read the same ids; its `_forward` (prefill
under the press, then `generate_answer`) runs unchanged.

Rows go to OUT/<model>/<method>@context-only/rate<r>/preds/<task>.jsonl (the full cache:
full/rate1) in kvc's prediction format (pred, answers, all_classes, length, _id, depth, plus
wall time); a run resumes from the rows already there (carry OUT back to go on), and the loop
stops cleanly at --deadline seconds. A table of wall time per run is printed last; times.json
in OUT sums them.

Presses and their settings are kvpress's defaults; the names map to kvc's methods of the same
paper (see PRESSES). Only the prefill presses both tools have are offered.
"""
import argparse
import json
import os
import sys
import time
import types


def stub_missing(name, **attrs):
    """kvpress's __init__ imports every press; DuoAttention's and the stats press's modules
    import `datasets` and `fire` at load time. When one is absent, a stub stands in: those presses are not
    run here, and calling the stub raises."""
    try:
        __import__(name)
    except ImportError:
        mod = types.ModuleType(name)

        def refuse(*_a, **_k):
            raise RuntimeError(f"{name} is a stub here (kvpress_side_by_side.py)")

        for a in attrs.get("names", []):
            setattr(mod, a, refuse)
        sys.modules[name] = mod


os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
stub_missing("datasets", names=["load_dataset"])
stub_missing("fire", names=["Fire"])

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import kvpress  # noqa: E402

transformers.utils.logging.disable_progress_bar()
from kvpress import (  # noqa: E402
    AdaKVPress,
    ChunkKVPress,
    CriticalKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    KVzipPress,
    LagKVPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

# kvc method name -> kvpress press at a compression ratio (kvpress's defaults otherwise).
PRESSES = {
    "snapkv": lambda r: SnapKVPress(compression_ratio=r),
    "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r),
    "ada-snapkv": lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)),
    "streamingllm": lambda r: StreamingLLMPress(compression_ratio=r),
    "tova": lambda r: TOVAPress(compression_ratio=r),
    "knorm": lambda r: KnormPress(compression_ratio=r),
    "keydiff": lambda r: KeyDiffPress(compression_ratio=r),
    "random": lambda r: RandomPress(compression_ratio=r),
    "lagkv": lambda r: LagKVPress(compression_ratio=r),
    "expected-attention": lambda r: ExpectedAttentionPress(compression_ratio=r),
    "kvzip": lambda r: KVzipPress(compression_ratio=r),
    "snapkv+chunkkv": lambda r: ChunkKVPress(SnapKVPress(compression_ratio=r)),
    "knorm+chunkkv": lambda r: ChunkKVPress(KnormPress(compression_ratio=r)),
    "snapkv+criticalkv": lambda r: CriticalKVPress(SnapKVPress(compression_ratio=r)),
    "knorm+criticalkv": lambda r: CriticalKVPress(KnormPress(compression_ratio=r)),
    "keydiff+criticalkv": lambda r: CriticalKVPress(KeyDiffPress(compression_ratio=r)),
    "tova+criticalkv": lambda r: CriticalKVPress(TOVAPress(compression_ratio=r)),
}


def rate_label(rate):
    return f"rate{int(rate)}" if float(rate).is_integer() else f"rate{rate}"


def done_ids(path):
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path) as f:
        for line in f:
            try:
                ids.add(json.loads(line)["_id"])
            except (json.JSONDecodeError, KeyError):
                pass  # a torn last line: that sample runs again
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("gguf_name")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--methods", default="snapkv,tova,knorm,keydiff,random,streamingllm,lagkv")
    ap.add_argument("--rates", default="2,4,8,16,32,64")
    ap.add_argument("--model-name", default="smollm2-135m")
    ap.add_argument("--per-task", type=int, default=0, help="the first N prompts of each task (0: all)")
    ap.add_argument("--deadline", type=float, default=1e9, help="stop after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    t_start = time.time()
    prompts = [json.loads(line) for line in open(args.prompts)]
    if args.per_task:
        seen = {}
        keep = []
        for p in prompts:
            seen[p["task"]] = seen.get(p["task"], 0) + 1
            if seen[p["task"]] <= args.per_task:
                keep.append(p)
        prompts = keep
    for m in args.methods.split(","):
        if m not in PRESSES:
            sys.exit(f"unknown method {m!r}: kvpress presses here are {', '.join(PRESSES)}")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, gguf_file=args.gguf_name, dtype=dtype, attn_implementation="sdpa"
    ).to(args.device).eval()
    # KVzipPress loads its tokenizer from `model.config.name_or_path` (the GGUF's directory),
    # where a GGUF-loaded model has no tokenizer files: write the GGUF's there once.
    if not os.path.exists(os.path.join(args.model_dir, "tokenizer_config.json")):
        tok.save_pretrained(args.model_dir)
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tok, device=args.device)
    versions = {
        "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(dtype),
    }
    print(json.dumps(versions), flush=True)
    runs = [("full", 1.0)] + [
        (m, float(r)) for m in args.methods.split(",") for r in args.rates.split(",")
    ]
    times_path = os.path.join(args.out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    stopped = False
    for method, rate in runs:
        name = "full" if method == "full" else f"{method}@context-only"
        run = f"{name}/{rate_label(rate)}"
        press = None if method == "full" else PRESSES[method](1.0 - 1.0 / rate)
        wall = run_prompts(pipe, press, prompts, args, name, rate, run, t_start)
        if wall is None:
            stopped = True
            break
        times[run] = times.get(run, 0.0) + wall
        write_json(times_path, {**times, "_versions": versions})
    print(f"{'run':32} {'kvpress s':>10}")
    for run, s in times.items():
        if not run.startswith("_"):
            print(f"{run:32} {s:10.1f}")
    print("stopped at the deadline: run again on the carried OUT to go on" if stopped else "done")


def run_prompts(pipe, press, prompts, args, name, rate, run, t_start):
    """One run over every prompt not yet written; its wall seconds, None at the deadline."""
    wall = 0.0
    root = os.path.join(args.out, args.model_name, run, "preds")
    os.makedirs(root, exist_ok=True)
    json.dump(
        {"model": args.model_name, "method": name, "rate": rate, "tool": "kvpress"},
        open(os.path.join(args.out, args.model_name, run, "run.json"), "w"),
    )
    done = {}  # per prediction file, the ids it holds (read once per run)
    for p in prompts:
        path = os.path.join(root, p["task"] + ".jsonl")
        if path not in done:
            done[path] = done_ids(path)
        if p["_id"] in done[path]:
            continue
        if time.time() - t_start > args.deadline:
            return None
        pipe.model.generation_config.eos_token_id = list(p["stop_ids"])
        q = p["question_tokens"]
        ids = torch.tensor([p["ids"]], dtype=torch.long)
        inputs = {"context_ids": ids[:, :-q], "questions_ids": [ids[:, -q:]]}
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        with torch.inference_mode():
            pred = pipe._forward(inputs, max_new_tokens=p["max_new_tokens"], press=press)[0]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        wall += dt
        row = {
            "pred": pred,
            "answers": p["answers"],
            "all_classes": p["all_classes"],
            "length": p["length"],
            "_id": p["_id"],
            "task": p["task"],
            "model": args.model_name,
            "method": name,
            "rate": rate,
            "question_in_window": method_in_window(name),
            "prompt_tokens": len(p["ids"]),
            "question_tokens": q,
            "depth": p["depth"],
            "wall_ms": dt * 1000.0,
        }
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return wall


def method_in_window(name):
    return not name.endswith("@context-only")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
