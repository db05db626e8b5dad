"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`): the repository root on the
import path, machine info, timing. Results are written with `core.io.write_json_atomic`."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a benchmark runs as a script: the project's packages import from the root


def timed(function, *args, **kwargs) -> tuple[float, object]:
    """(wall seconds, result) of `function(*args, **kwargs)`."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def machine() -> dict:
    """What the figures were measured on."""
    found = {"cpus": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
             "platform": platform.platform()}  # fmt: skip
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found
