"""Adapters: LoRA settings, the tokenizer a run trains with, and a model wrapped for a training mode (LoRA and/or
planning-token rows). Trained weights are put back by `models.trained_weights`."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.fingerprint import fingerprint, keep_fingerprint
from models.loading import ModelSpec, load_tokenizer
from models.modes import TrainingMode
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    mode: TrainingMode | str,
    lora: LoraSpec,
    planning: PlanningSpec,
    new_tokens: set[str],
) -> PreTrainedModel | PeftModel:
    """`model` with room for the planning tokens (rows of `new_tokens` initialised from their key words) and
    wrapped for `mode`: LoRA adapters and/or PEFT trainable tokens (only the planning rows train). With
    `planning.untie_output` the output rows are a matrix of their own (a tied lm_head is copied first). The
    result carries the fingerprint of the base weights (`models.fingerprint`), taken before any row is added."""
    mode = TrainingMode(mode)
    base_fingerprint = fingerprint(model)
    if planning.untie_output and planning.active:
        untie_output_embeddings(model)
    key_tokens, words = planning.key_tokens(), {key: planning.init_word(key) for key in planning.key_tokens()}
    ids = resize_and_initialise(model, tokenizer, key_tokens, words, new_tokens, planning.init_spread)
    if mode.uses_lora:
        model = get_peft_model(
            model, lora.to_config(trainable_token_targets(model, ids) if mode.trains_token_rows else None)
        )
    elif mode.trains_token_rows:
        model = get_peft_model(model, prompt_tuning_config(model, ids))
    keep_fingerprint(model, base_fingerprint)
    return model
