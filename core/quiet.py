"""Third-party log messages that are noise on every command, dropped at their source; every other message stays.

Importing this module installs the filters. It imports nothing but `logging`, so entry points import it before
the libraries that would log (cli.py does so first).

- bitsandbytes (imported by peft) tries, on CPUs with AVX512-BF16 and where the `kernels` package is installed
  (vLLM's CPU build brings it), to fetch a 4-bit CPU matmul kernel from the hub; `kernels` refuses a repository
  whose publisher it cannot verify, and bitsandbytes logs a WARNING that mentions `trust_remote_code` and falls
  back to its own kernel. With HF_HUB_OFFLINE=1, `kernels` first logs that it skips that check. The project never
  sets trust_remote_code for it and runs 4-bit layers on CUDA only (model.quantization needs a GPU), so neither
  message says anything about a run. Only these two messages, for that one repository, are dropped.
"""

from __future__ import annotations

import logging

# logger name -> the start of each message dropped from it (exactly these; other records of the logger pass)
NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
}


class DropMessages(logging.Filter):
    """Drops the records whose message (the format string, before arguments) starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters of NOISE on their loggers (once; a logger's filters apply to the records it emits)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropMessages) for existing in logger.filters):
            logger.addFilter(DropMessages(prefixes))


quiet_third_party()
