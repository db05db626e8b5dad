"""No compiled code from the hub unless the user asks: the `kernels` package is blocked in our processes.

bitsandbytes (imported by peft) calls `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` at import
on CPUs with AVX512-BF16, where the `kernels` package is installed (vLLM's CPU build brings it): with network access
that downloads a compiled kernel and loads it into the process, on every command. A checkpoint or config never asks
for it; nothing of ours uses `kernels`. Importing this module (cli.py and models/ do so first) makes `import kernels`
fail, so bitsandbytes falls back to its own CPU kernel. `REASONING_LAB_HUB_KERNELS=1` leaves `kernels` importable.
"""

from __future__ import annotations

import os
import sys

ALLOW = "REASONING_LAB_HUB_KERNELS"


def block_hub_kernels() -> None:
    """Make `import kernels` raise ImportError in this process (unless REASONING_LAB_HUB_KERNELS=1, or it was
    imported already)."""
    if os.environ.get(ALLOW) != "1":
        sys.modules.setdefault("kernels", None)


block_hub_kernels()
