"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import platform
import time

import torch


def timed(function, *args) -> tuple[float, object]:
    """(wall seconds, result) of `function(*args)`."""
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpus": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()}
