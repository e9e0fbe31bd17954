#!/usr/bin/env bash
# Create (or reuse) the Python venv that runs LongBench's official metrics for the conformance
# test (tests/score_conformance.rs). Pins the versions named in docs/longbench-spec.md §0:
#   rouge 1.0.1 (pltrdy), jieba 0.42.1, fuzzywuzzy 0.18.0; numpy 2.4.6 for eval.py --e np.mean;
#   python-Levenshtein for the optional fuzz backend (blocked in difflib mode by the script);
#   tiktoken 0.14.0, the judge of the Llama-3 tokenizer (tests/llama3_tokenizer.rs).
# Usage: scripts/conformance-venv.sh [VENV_DIR]   (default: .venv-conformance, git-ignored)
# Prints the venv's python path on the last line of stdout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-conformance}"
py="${PYTHON:-python3}"
stamp="$venv/.kvc-pins-v3"
if [[ ! -f "$stamp" ]]; then
  echo "conformance-venv: creating $venv" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "rouge==1.0.1" "jieba==0.42.1" "fuzzywuzzy==0.18.0" "numpy==2.4.6" \
    "python-Levenshtein==0.27.5" "tiktoken==0.14.0" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
