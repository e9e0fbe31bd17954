#!/usr/bin/env bash
# The whole test suite from a fresh clone (the README's test command; .ci/run calls it).
#   scripts/test.sh            # CPU: fetch model, conformance venv, cargo test, then the
#                              # README's first command in a fresh clone (readme-main-job.sh)
#   scripts/test.sh --cuda     # also check that the CUDA build compiles (toolchain from PyPI)
# Installs what it needs: Rust (rustup, when cargo is missing), the embedded model
# (scripts/fetch-model.sh), RULER's word lists and essays (scripts/fetch-ruler-sources.sh), the Python venv with LongBench's official metrics
# (scripts/conformance-venv.sh). Set CARGO_TARGET_DIR to a persistent directory to speed up
# warm runs; nothing relies on it.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=0
for a in "$@"; do
  case $a in
    --cuda) cuda=1 ;;
    *) echo "test.sh: unknown argument $a (use --cuda)" >&2; exit 2 ;;
  esac
done
t0=$SECONDS
target=${CARGO_TARGET_DIR:-target}
# Each stamp also reports the disk: the CI machine's disk is small (a run once failed with
# "No space left on device" in the CUDA step), so the footprint is measured, not guessed.
stamp() {
  local used free
  used=$(du -sh "$target" 2>/dev/null | cut -f1 || true)
  free=$(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ' || true)
  echo "test.sh: [$((SECONDS - t0))s] $* (target ${used:-0}, disk free ${free:-?})" >&2
}
# Incremental compilation state is for edit-compile loops; on a clean clone it only costs
# disk (GBs with many test binaries) and time. A developer's exported value wins.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

if ! command -v cargo >/dev/null; then
  stamp "installing Rust with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >&2
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
stamp "fetching the embedded model"
scripts/fetch-model.sh
scripts/fetch-llama3-tokenizer.sh
scripts/fetch-ruler-sources.sh
stamp "preparing the LongBench metrics venv"
export KVC_CONFORMANCE_VENV=${KVC_CONFORMANCE_VENV:-$PWD/.venv-conformance}
scripts/conformance-venv.sh "$KVC_CONFORMANCE_VENV" >/dev/null
stamp "cargo fetch"
cargo fetch --locked
stamp "building tests"
cargo test --locked --no-run
stamp "running tests"
CI=${CI:-1} cargo test --locked -- --test-threads=2
stamp "CPU tests passed"
stamp "the README's first command in a fresh clone (release build)"
scripts/readme-main-job.sh
stamp "README main job passed"
stamp "Slurm: a 3-task array on a one-node cluster, merged == unsharded (scripts/slurm/test-local.sh)"
scripts/slurm/test-local.sh
stamp "Slurm array test passed"
if [[ $cuda == 1 ]]; then
  # A compile check, so the dev profile in the same target directory as the tests: every
  # crate that the `cuda` feature does not touch (tokenizers, plotters, ...) is reused, and only
  # candle, cudarc, our kernels (nvcc) and kvc are rebuilt. The GPU binaries themselves are
  # release builds (scripts/gpu/README.md); this checks that the same code compiles.
  # The CPU build of kvc itself (lib, bins, ~15 test executables) is rebuilt with the feature
  # anyway; removing it first keeps the peak disk use near one build, not two.
  cargo clean --locked -p kvc
  stamp "CUDA toolchain + cargo build --features cuda (bins + the CUDA kernel tests)"
  eval "$(scripts/cuda-toolchain.sh)"
  cargo build --locked --features cuda --bins --test cuda_kernels
  stamp "CUDA build compiles"
fi
stamp "done"
