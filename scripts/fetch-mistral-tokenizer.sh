#!/usr/bin/env bash
# Fetches Mistral-7B's v1 tokenizer (32000-token SentencePiece, the tokenizer of Mistral-7B
# v0.1/v0.2) from the PyPI package mistral_common==1.13.1 (mistral_common/data/tokenizer.model.v1),
# checks its sha256, converts it to tokenizer.json with transformers 4.46.3's LlamaConverter (the
# converter the hub's tokenizer.json files were written with; legacy normalizer, `<s>` prepended)
# in a throwaway venv, and writes models/mistral-7b-tokenizer/{tokenizer.model, tokenizer.json,
# tokenizer_config.json (Mistral-7B-Instruct-v0.2's chat template)} (git-ignored). Checks that the
# converted tokenizer gives SentencePiece's own ids on a few texts. Used by random-weight Mistral
# checkpoints (scripts/gpu/make_checkpoint.py --tokenizer-dir). KVC_MODELS_DIR overrides models/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${KVC_MODELS_DIR:-$here/models}/mistral-7b-tokenizer
want=dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055
if [[ -f $dest/tokenizer_config.json ]] && [[ $(sha256sum "$dest/tokenizer.model" | cut -d' ' -f1) == "$want" ]]; then
  echo "fetch-mistral-tokenizer: $dest present (sha256 ok)" >&2; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" mistral_common==1.13.1 >&2
python3 -m zipfile -e "$tmp"/mistral_common-1.13.1-*.whl "$tmp/x" >&2
model=$tmp/x/mistral_common/data/tokenizer.model.v1
got=$(sha256sum "$model" | cut -d' ' -f1)
if [[ $got != "$want" ]]; then
  echo "fetch-mistral-tokenizer: sha256 mismatch: got $got, want $want" >&2; exit 2
fi
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q transformers==4.46.3 sentencepiece==0.2.0 protobuf >&2
mkdir -p "$dest.part"
cp "$model" "$dest.part/tokenizer.model"
"$tmp/venv/bin/python" - "$dest.part" <<'PY'
import json, os, sys
import sentencepiece as spm
from tokenizers import processors
from transformers import LlamaTokenizer
from transformers.convert_slow_tokenizer import LlamaConverter
out = sys.argv[1]
model = os.path.join(out, "tokenizer.model")
slow = LlamaTokenizer(vocab_file=model, legacy=True)
tok = LlamaConverter(slow).converted()
tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
sp = spm.SentencePieceProcessor(model_file=model)
for s in ["Hello world, 你好 def f(x): return x", "  two spaces\n\nnewlines\ttab",
          "数字 12345 and émoji 🙂", "[INST] What is 2+2? [/INST]"]:
    got, want = tok.encode(s).ids, [1] + sp.encode(s)
    assert got == want, (s, got, want)
tok.save(os.path.join(out, "tokenizer.json"))
template = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
            "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
            "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
            "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
            "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
            "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
       "unk_token": "<unk>", "legacy": True, "chat_template": template,
       "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
       "tokenizer_class": "PreTrainedTokenizerFast", "use_default_system_prompt": False}
json.dump(cfg, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
PY
rm -rf "$dest"; mv "$dest.part" "$dest"
echo "fetch-mistral-tokenizer: $dest (sha256 ok, ids equal SentencePiece's)" >&2
