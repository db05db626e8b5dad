"""Padding token-id sequences into batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Stack int sequences into a [batch, longest] tensor, padding on the `side` given."""
    longest = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if side == "right":
            out[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        else:
            out[row, longest - len(sequence) :] = torch.as_tensor(sequence, dtype=torch.long)
    return out
