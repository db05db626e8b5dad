"""Adapters: LoRA settings, a model wrapped for a training mode (LoRA and/or planning-token rows), and a trained
adapter's weights put back on the unquantised base model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.errors import UserInputError
from models.loading import ModelSpec, load_model, load_tokenizer
from models.vocabulary import (
    add_tokens,
    prompt_tuning_config,
    resize_and_initialise,
    trainable_token_targets,
    untie_output_embeddings,
)
from tasks.planning import PlanningSpec


@dataclass
class LoraSpec:
    """LoRA adapter settings (modes lora, qlora and their +prompt-tuning variants)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Module names to adapt: the MLP by default; add q_proj, k_proj, v_proj, o_proj for attention."""

    def to_config(self, trainable_token_indices: dict[str, list[int]] | None = None) -> LoraConfig:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            trainable_token_indices=trainable_token_indices,
        )


def planning_tokenizer(backbone: ModelSpec, planning: PlanningSpec) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The tokenizer a run trains with: the backbone's, plus the planning tokens (those it did not have yet
    are returned: their embedding rows are new)."""
    tokenizer = load_tokenizer(backbone)
    return tokenizer, add_tokens(tokenizer, planning.tokens())


def build_trainable_model(
    model: PreTrainedModel, tokenizer, mode: str, lora: LoraSpec, planning: PlanningSpec, new_tokens: set[str]
) -> PreTrainedModel | PeftModel:
    """`model` with room for the planning tokens (rows of `new_tokens` initialised from their key words) and
    wrapped for `mode`: LoRA adapters and/or PEFT trainable tokens (only the planning rows train). With
    `planning.untie_output` the output rows are a matrix of their own (a tied lm_head is copied first)."""
    if planning.untie_output and planning.active:
        untie_output_embeddings(model)
    key_tokens, words = planning.key_tokens(), {key: planning.init_word(key) for key in planning.key_tokens()}
    ids = resize_and_initialise(model, tokenizer, key_tokens, words, new_tokens, planning.init_spread)
    if mode in ("lora", "qlora"):
        return get_peft_model(model, lora.to_config())
    if mode in ("lora+prompt-tuning", "qlora+prompt-tuning"):
        return get_peft_model(model, lora.to_config(trainable_token_targets(model, ids)))
    if mode == "prompt-tuning":
        return get_peft_model(model, prompt_tuning_config(model, ids))
    return model


def rebuild_with_adapter(
    backbone: ModelSpec,
    lora: LoraSpec,
    adapter: dict,
    source: str,
    mode: str = "lora",
    planning: PlanningSpec | None = None,
) -> PeftModel:
    """The unquantised `backbone` on the CPU, wrapped for `mode` (LoRA and/or planning-token rows) and holding
    the trained `adapter` weights (keys as in the PEFT model). One path for exports and evaluation, LoRA and
    QLoRA (merging into 4-bit weights would lose precision) and FSDP-gathered weights; what does not fit is
    named in one line."""
    planning = planning or PlanningSpec()
    mode = mode.replace("qlora", "lora")
    tokenizer, new_tokens = planning_tokenizer(backbone, planning)
    base = load_model(replace(backbone, quantization=None, gradient_checkpointing=False))
    peft_model = build_trainable_model(base, tokenizer, mode, lora, planning, set(new_tokens))
    try:
        result = peft_model.load_state_dict(adapter, strict=False)
    except RuntimeError as error:  # shapes differ
        raise UserInputError(
            f"{source} does not match model {backbone.name}: {str(error).splitlines()[-1].strip()}"
        ) from None
    missing = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad} - set(adapter)
    if result.unexpected_keys or missing:
        example = sorted(result.unexpected_keys or missing)[0]
        raise UserInputError(
            f"{source} does not match model {backbone.name} with its {mode} settings: "
            f"{len(result.unexpected_keys)} unexpected and {len(missing)} missing adapter weights, e.g. '{example}'"
        )
    return peft_model
