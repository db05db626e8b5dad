"""Reading a torch checkpoint file safely: weights only, memory-mapped, one clear error when it cannot be used."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from core.errors import UserInputError


def read_checkpoint(path: str | Path) -> dict:
    """The contents of the `torch.save` file at `path`, loaded with `weights_only=True` (no code runs) and
    `mmap=True` (tensors stay on disk until used). A missing, truncated or pickled-object file is one
    `UserInputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint '{path}' does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise UserInputError(
            f"checkpoint '{path}': not a plain-weights checkpoint (refused: {detail.strip()[:200]})"
        ) from None
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt file fails in many ways; one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserInputError(f"checkpoint '{path}': unreadable (truncated or corrupt? {first[:200]})") from None
    if not isinstance(saved, dict):
        raise UserInputError(f"checkpoint '{path}': expected a dictionary of weights, found {type(saved).__name__}")
    return saved


def last_finite_checkpoint(folders: list[Path], before_step: int) -> tuple[Path, int] | None:
    """The newest `*.ckpt` in `folders` saved before optimizer step `before_step` whose weights are all finite,
    with its step (links such as `last.ckpt` are named by their target); None when there is none. Unreadable
    files are passed over."""
    found: dict[Path, int] = {}
    for path in {p.resolve() for folder in folders for p in Path(folder).glob("*.ckpt")}:
        try:
            saved = read_checkpoint(path)
        except UserInputError:
            continue
        step, weights = saved.get("global_step", -1), saved.get("state_dict", {}).values()
        if 0 <= step < before_step and all(torch.isfinite(value).all() for value in weights):
            found[path] = step
    if not found:
        return None
    path = max(found, key=lambda p: (found[p], p.stat().st_mtime))
    return path, found[path]
