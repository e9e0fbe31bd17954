"""The judge of kvc's Llama-3 tokenizer: tiktoken itself on Meta's tokenizer.model, set up as
Meta's llama_models.llama3.tokenizer.Tokenizer does (its split pattern; Llama-3.1's special
token names, as transformers' converter writes them).

    python3 scripts/llama3_tiktoken_ids.py TOKENIZER_MODEL < texts.json > ids.json

stdin: a JSON list of strings; stdout: a JSON list of id lists (special-token strings in the
text encode as the special tokens, as a Hugging Face tokenizer does).
"""
import base64
import json
import sys

import tiktoken

PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def main(path):
    ranks = {}
    for line in open(path, "rb"):
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    specials = NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
    enc = tiktoken.Encoding(name="llama3", pat_str=PAT, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(specials)})
    texts = json.load(sys.stdin)
    json.dump([enc.encode(t, allowed_special="all") for t in texts], sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
