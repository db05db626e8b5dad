"""Which base weights a run trained on: a fingerprint recorded at training time and checked when its adapter or
weights are loaded, so that weights trained on another backbone of the same shapes are refused, not silently
merged (a recorded backbone *name* that differs only warns: a folder may have moved).

The fingerprint is a sha256 of 16 rows spread over the input-embedding matrix as the backbone loaded it, before
any planning row is added, rounded to bfloat16 (so a float32 and a bfloat16 load of the same weights agree). It
names the dtype the training model held them in (`float16:...`): a load casts to that dtype before rounding, so
a 16-true run agrees with a float32 load too. Embeddings are never quantised (QLoRA) and are read before FSDP
shards them (rank 0 holds the weights), so every way a run trains gives the plain load's fingerprint.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from core.errors import UserInputError

ROWS = 16
ATTRIBUTE = "base_fingerprint"
"""Where `keep_fingerprint` keeps a training model's fingerprint (on the model it returns)."""


def fingerprint(model: nn.Module, dtype: str | None = None) -> str | None:
    """The fingerprint of `model`'s base weights (call it before planning rows are added), its values cast to
    `dtype` (a torch dtype name; None = as held) first; None for a model whose weights are not loaded (meta)."""
    matrix = model.get_input_embeddings().weight
    if matrix.is_meta:
        return None
    rows = torch.tensor(sorted({index * (matrix.shape[0] - 1) // (ROWS - 1) for index in range(ROWS)}))
    held = str(matrix.dtype).removeprefix("torch.")
    values = matrix.detach()[rows.to(matrix.device)].cpu()
    values = values.to(getattr(torch, dtype or held)).to(torch.bfloat16)
    digest = hashlib.sha256(str(tuple(matrix.shape)).encode())
    digest.update(values.view(torch.int16).numpy().tobytes())
    return f"{dtype or held}:{digest.hexdigest()[:16]}"


def keep_fingerprint(model: nn.Module, value: str | None) -> None:
    """Keep the fingerprint `value` of a training model's base weights on the model (see `recorded_fingerprint`)."""
    setattr(model, ATTRIBUTE, value)


def recorded_fingerprint(model: nn.Module | None) -> str | None:
    """The fingerprint `keep_fingerprint` kept on a training model (None: none, or weights not on this rank)."""
    return getattr(model, ATTRIBUTE, None)


def check_fingerprint(recorded: str | None, base: nn.Module, backbone: str, source: str) -> None:
    """Refuse `source`'s weights when they were trained on other base weights than `base` (the backbone `backbone`
    as loaded, before planning rows); files that record no fingerprint load as before."""
    if recorded is None:
        return
    dtype = recorded.split(":", 1)[0]
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserInputError(f"{source}: unreadable base fingerprint '{recorded}'")
    refuse_other_base(recorded, fingerprint(base, dtype), backbone, source)


def refuse_other_base(recorded: str | None, found: str | None, backbone: str, source: str) -> None:
    """One UserInputError when `source` recorded another base fingerprint than the one `found` for `backbone`
    (nothing to compare when either is None, or when they were taken from weights held in different dtypes)."""
    comparable = recorded is not None and found is not None and recorded.split(":")[0] == found.split(":")[0]
    if comparable and found != recorded:
        raise UserInputError(
            f"{source} was trained on other base weights than {backbone} (base fingerprint {recorded} vs {found}): "
            "use the backbone it was trained on"
        )
