#!/usr/bin/env bash
# Fetches Meta's Llama-3 tokenizer (tiktoken format) from the PyPI package llama-models==0.3.0,
# checks its sha256 and puts it at models/llama3/tokenizer.model (git-ignored). Used by the
# tokenizer test (tests/llama3_tokenizer.rs) and by random-weight Llama checkpoints
# (scripts/gpu/make_checkpoint.py). KVC_MODELS_DIR overrides models/. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${KVC_MODELS_DIR:-$here/models}/llama3
want=82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55
mkdir -p "$dest"
if [[ -f $dest/tokenizer.model ]] && [[ $(sha256sum "$dest/tokenizer.model" | cut -d' ' -f1) == "$want" ]]; then
  echo "fetch-llama3-tokenizer: $dest/tokenizer.model present (sha256 ok)" >&2; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" llama-models==0.3.0 >&2
python3 -m zipfile -e "$tmp"/llama_models-0.3.0-*.whl "$tmp/x" >&2
got=$(sha256sum "$tmp/x/llama_models/llama3/tokenizer.model" | cut -d' ' -f1)
if [[ $got != "$want" ]]; then
  echo "fetch-llama3-tokenizer: sha256 mismatch: got $got, want $want" >&2; exit 2
fi
mv "$tmp/x/llama_models/llama3/tokenizer.model" "$dest/tokenizer.model.part"
mv "$dest/tokenizer.model.part" "$dest/tokenizer.model"
echo "fetch-llama3-tokenizer: $dest/tokenizer.model (sha256 ok)" >&2
