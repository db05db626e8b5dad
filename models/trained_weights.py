"""Trained weights put back into a model: the one place that does it, for every path (an `epoch_N/` or HF
`checkpoint-N/` adapter folder, an adapter-only or merged export being written, a Lightning `.ckpt`, dynamics'
adapter swap).

`load_weights` is the one check: weights that a model does not have, or trainable weights that the file lacks,
are one UserInputError ("<source> does not match this model (backbone ..., mode ...): ..."); so are weights of
another shape. `trained_model` rebuilds the model a run trained (on the unquantised backbone, whose base weights
must be the ones the run recorded: `models.fingerprint`) and loads its weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from core.errors import UserInputError
from models.adapters import LoraSpec, build_trainable_model, planning_tokenizer
from models.fingerprint import check_fingerprint
from models.loading import ModelSpec, load_model
from models.modes import TrainingMode
from tasks.planning import PlanningSpec


def plain_backbone(backbone: ModelSpec) -> ModelSpec:
    """`backbone` as trained weights are merged and evaluated: unquantised (merging into 4-bit weights would lose
    precision), without gradient checkpointing."""
    return replace(backbone, quantization=None, gradient_checkpointing=False)


def load_weights(
    model: PreTrainedModel | PeftModel,
    weights: dict[str, torch.Tensor],
    source: str,
    backbone: str,
    mode: str,
    peft_format: bool = False,
) -> None:
    """Load `weights` into `model` (in place): a PEFT model's adapter weights (named as in the model, or as PEFT
    saves them with `peft_format`), or every weight of a plain model. Unexpected weights, missing ones (every
    adapter weight, or every weight of a plain model) and other shapes are one UserInputError naming `source`."""
    required = {name for name, _ in model.named_parameters()}
    if isinstance(model, PeftModel):
        required = {name for name in required if model.active_adapter in name.split(".")}
    # PEFT saves a tied lm_head's trainable rows twice and loads them once: what it would save is expected
    saved_names = set(get_peft_model_state_dict(model)) if peft_format else None
    try:
        if peft_format:
            result = set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
        else:
            result = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shapes differ
        raise UserInputError(f"{_mismatch(source, backbone, mode)}: {_last_line(error)}") from None
    unexpected = set(weights) - saved_names if peft_format else set(result.unexpected_keys)
    refuse_mismatch(required & set(result.missing_keys), unexpected, source, backbone, mode)


def refuse_mismatch(missing: set[str], unexpected: set[str], source: str, backbone: str, mode: str) -> None:
    """The one error for trained weights that do not fit a model: counts of unexpected and missing weight names
    and one example (nothing when both are empty)."""
    if missing or unexpected:
        example = sorted(unexpected or missing)[0]
        raise UserInputError(
            f"{_mismatch(source, backbone, mode)}: {len(unexpected)} unexpected and {len(missing)} missing weights, "
            f"e.g. '{example}'"
        )


def trained_model(
    backbone: ModelSpec,
    mode: str,
    lora: LoraSpec,
    planning: PlanningSpec,
    weights: dict[str, torch.Tensor],
    source: str,
    fingerprint: str | None = None,
    merge: bool = True,
) -> PreTrainedModel | PeftModel:
    """The model a run trained in `mode` on `backbone`, rebuilt unquantised on the CPU, holding its trainable
    `weights` (named as in the training model, without the LightningModule's `model.` prefix): adapters and
    planning-token rows merged into a plain HF model, or (`merge` False) the PEFT model itself. `fingerprint`:
    the base weights the run recorded (checked against the backbone's)."""
    mode = TrainingMode(mode).unquantized
    tokenizer, new_tokens = planning_tokenizer(backbone, planning)
    base = load_model(plain_backbone(backbone))
    check_fingerprint(fingerprint, base, backbone.name, source)
    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights are drawn, then replaced
        model = build_trainable_model(base, tokenizer, mode, lora, planning, set(new_tokens))
    load_weights(model, weights, source, backbone.name, mode)
    return model.merge_and_unload() if merge and isinstance(model, PeftModel) else model


def adapter_model(base: PreTrainedModel, config: PeftConfig) -> PeftModel:
    """`base` wrapped for inference with the adapter of `config` (its weights still to load: `load_weights`)."""
    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights are drawn, then replaced
        return get_peft_model(base, replace(config, inference_mode=True))


def _mismatch(source: str, backbone: str, mode: str) -> str:
    return f"{source} does not match this model (backbone {backbone}, mode {mode})"


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
