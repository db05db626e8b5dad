"""The keys `cli.py fit` adds to a Lightning checkpoint, written and read only here.

Beside Lightning's own keys: `planning_tokens` (key -> tokens, the layout the run trained), `rng_states` (opaque:
what the fine-tuner saves to continue its random stream), `base_fingerprint` (`models.fingerprint`) and
`extras_format_version`; `state_dict` holds only the trainable weights in every mode but full. A checkpoint
without a version is version 1 (written before versions existed); a newer version is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from core.errors import UserInputError
from models.training_info import check_format_version

FORMAT_VERSION = 1
VERSION_KEY = "extras_format_version"
MODULE_PREFIX = "model."
"""What the LightningModule puts before its HF model's weight names."""


@dataclass(frozen=True)
class CheckpointExtras:
    planning_tokens: dict[str, list[str]] | None = None
    """None: a checkpoint that records none (the fine-tuner then compares nothing)."""
    rng_states: dict = field(default_factory=dict)
    base_fingerprint: str | None = None
    format_version: int = FORMAT_VERSION


def write_extras(checkpoint: dict, extras: CheckpointExtras, keep: set[str] | None = None) -> None:
    """Add `extras` to the Lightning `checkpoint` (in place); `keep`: the only weight names its state dict keeps."""
    checkpoint[VERSION_KEY] = extras.format_version
    checkpoint["planning_tokens"] = extras.planning_tokens
    checkpoint["rng_states"] = extras.rng_states
    if extras.base_fingerprint is not None:
        checkpoint["base_fingerprint"] = extras.base_fingerprint
    if keep is not None:
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in keep}


def read_extras(checkpoint: Mapping, source: str) -> CheckpointExtras:
    """The extras of a Lightning `checkpoint` (already read); a version this code does not know is one
    UserInputError naming `source`."""
    version = checkpoint.get(VERSION_KEY, 1)
    check_format_version(version, FORMAT_VERSION, source)
    return CheckpointExtras(
        checkpoint.get("planning_tokens"),
        checkpoint.get("rng_states") or {},
        checkpoint.get("base_fingerprint"),
        version,
    )


def trained_weights(checkpoint: Mapping, source: str) -> dict[str, torch.Tensor]:
    """The weights a `cli.py fit` checkpoint holds, named as in the HF / PEFT model it trained."""
    if "state_dict" not in checkpoint:
        raise UserInputError(f"{source}: not a Lightning checkpoint of cli.py fit (no state_dict)")
    return module_weights(checkpoint["state_dict"])


def module_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LightningModule's state dict named as in its HF / PEFT model (without the `model.` prefix)."""
    return {key.removeprefix(MODULE_PREFIX): value for key, value in state.items()}
