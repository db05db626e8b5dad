"""The global torch RNG states (CPU, and every CUDA device when there is one), saved and restored: what a checkpoint
keeps so that dropout continues exactly on resume."""

from __future__ import annotations

import torch


def rng_states() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """{"torch": the CPU state} plus {"cuda": one state per device} when CUDA is available."""
    states: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Set the states `rng_states()` returned; a state that is absent (or CUDA's, on a machine without CUDA) is
    left as it is."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
