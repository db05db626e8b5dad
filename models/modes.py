"""The training mode: which weights a run trains, and what follows from it (quantised base, LoRA adapters, planning-
token rows, what a checkpoint keeps).

`Mode` is the config value (`model.init_args.mode`: a Literal, since jsonargparse parses Enums by name);
`TrainingMode` answers every question about it, so no code tests the string itself.
"""

from __future__ import annotations

from typing import Literal, get_args

from core.errors import UserInputError

Mode = Literal["full", "lora", "qlora", "prompt-tuning", "lora+prompt-tuning", "qlora+prompt-tuning"]
TOKEN_SUFFIX = "+prompt-tuning"


class TrainingMode(str):
    """A `Mode` value and its meaning: full (every weight), lora (adapters on a frozen model), qlora (adapters on
    a 4/8-bit model), prompt-tuning (only the planning tokens' rows), and the LoRA modes `+prompt-tuning` (both).
    Immutable, and still the config string (it compares, prints and serialises as one)."""

    __slots__ = ()

    def __new__(cls, mode: str) -> TrainingMode:
        if mode not in get_args(Mode):
            raise UserInputError(f"model.mode must be one of {', '.join(get_args(Mode))}, got '{mode}'")
        return super().__new__(cls, mode)

    @property
    def full(self) -> bool:
        """Every weight trains (no PEFT wrapping)."""
        return self == "full"

    @property
    def uses_lora(self) -> bool:
        """LoRA adapters train."""
        return self.removesuffix(TOKEN_SUFFIX) in ("lora", "qlora")

    @property
    def quantized(self) -> bool:
        """The frozen base is loaded 4/8-bit (QLoRA)."""
        return self.startswith("qlora")

    @property
    def trains_token_rows(self) -> bool:
        """The planning tokens' embedding (and lm_head) rows train."""
        return self == "prompt-tuning" or self.endswith(TOKEN_SUFFIX)

    @property
    def saves_trainable_only(self) -> bool:
        """Checkpoints keep only the trainable weights (the frozen base is the backbone's)."""
        return not self.full

    @property
    def unquantized(self) -> TrainingMode:
        """The same mode on an unquantised base (qlora -> lora): how trained weights are merged and evaluated."""
        return TrainingMode(str.replace(self, "qlora", "lora"))

    @property
    def lora_only(self) -> bool:
        """Only LoRA adapters train (no planning-token rows): the trained weights fit an unresized base."""
        return self.uses_lora and not self.trains_token_rows
