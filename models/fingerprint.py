"""Which base weights a run trained on: a fingerprint recorded at training time and checked when its adapter or
weights are loaded, so that weights trained on another backbone of the same shapes are refused, not silently
merged (a recorded backbone *name* that differs only warns: a folder may have moved).

The fingerprint is a sha256 of the matrix's shape and of the sign bits of 64 rows spread over the input-embedding
matrix as the backbone loaded it, before any planning row is added. A weight's sign survives every cast between
float32, bfloat16 and float16 (rounded values would not: float32 -> float16 -> bfloat16 differs from float32 ->
bfloat16), so a run trained in bf16-true, 16-true, QLoRA (embeddings are never quantised, and are upcast to
float32) or FSDP (rank 0 fingerprints before sharding) agrees with any plain load of the same weights; two
different weight sets disagree on about half of the signs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from core.errors import UserInputError

ROWS = 64
ATTRIBUTE = "base_fingerprint"
"""Where `keep_fingerprint` keeps a training model's fingerprint (on the model itself)."""


def fingerprint(model: nn.Module) -> str | None:
    """The fingerprint of `model`'s base weights (take it before planning rows are added); None for a model whose
    weights are not loaded (meta tensors: FSDP ranks > 0)."""
    matrix = model.get_input_embeddings().weight
    if matrix.is_meta:
        return None
    rows = torch.tensor(sorted({index * (matrix.shape[0] - 1) // (ROWS - 1) for index in range(ROWS)}))
    signs = torch.signbit(matrix.detach()[rows.to(matrix.device)]).cpu().numpy()
    digest = hashlib.sha256(str(tuple(matrix.shape)).encode())
    digest.update(signs.tobytes())
    return digest.hexdigest()[:16]


def keep_fingerprint(model: nn.Module, value: str | None) -> None:
    """Keep the fingerprint `value` of a training model's base weights on the model (see `recorded_fingerprint`)."""
    setattr(model, ATTRIBUTE, value)


def recorded_fingerprint(model: nn.Module | None) -> str | None:
    """The fingerprint `keep_fingerprint` kept on a training model (None: none, or weights not on this rank)."""
    return getattr(model, ATTRIBUTE, None)


def check_fingerprint(recorded: str | None, base: nn.Module, backbone: str, source: str) -> None:
    """Refuse `source`'s weights when they were trained on other base weights than `base` (the backbone `backbone`
    as loaded, before planning rows); files that record no fingerprint load as before."""
    if recorded is not None:
        refuse_other_base(recorded, fingerprint(base), backbone, source)


def refuse_other_base(recorded: str | None, found: str | None, backbone: str, source: str) -> None:
    """One UserInputError when `source` recorded another base fingerprint than the one `found` for `backbone`
    (nothing to compare when either is None)."""
    if recorded is not None and found is not None and found != recorded:
        raise UserInputError(
            f"{source} was trained on other base weights than {backbone} (base fingerprint {recorded} vs {found}): "
            "use the backbone it was trained on"
        )
