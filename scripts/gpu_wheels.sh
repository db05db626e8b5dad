#!/usr/bin/env bash
# Wheels that scripts/gpu_check.py needs on the device machine and its image lacks (it has no package registry):
# pure-Python packages, pinned to the versions the project is tested with, saved to .whl/ (git-ignored via
# .git/info/exclude) for the device call to carry (`carry: [".whl"]`). About 2 MiB, 43 MiB with bitsandbytes.
#   bash scripts/gpu_wheels.sh            # without bitsandbytes (the qlora_nf4 item is then skipped)
#   bash scripts/gpu_wheels.sh --qlora    # with bitsandbytes (41 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" && { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"; }
packages=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 math-verify==0.9.0
          latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
[[ "${1:-}" == "--qlora" ]] && packages+=(bitsandbytes==0.50.2)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
du -sh .whl
