"""Random-weight models from a config and a byte-level BPE tokenizer trained on bundled text, built in-process.

For tests and the GPU check (scripts/gpu_check.py): no download, any size, saved as an ordinary HF folder that
every entry point loads like a hub model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported when used: callers may set HF_* variables after importing this
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer(jsonl: Path, vocab_size: int = 512, lines: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the string fields of the first `lines` records of `jsonl`, with
    <|endoftext|> (unk), <|im_start|>, <|im_end|> (eos and pad) and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    records = jsonl.read_text().splitlines()[:lines]
    texts = [text for line in records for text in json.loads(line).values() if isinstance(text, str)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def random_model(kind: str, vocab_size: int, seed: int = 0, **config) -> PreTrainedModel:
    """A seeded random-weight Llama, Qwen2 or Gemma2 (final logit soft-capping) causal LM; `config` sets its shape
    (default: 2 layers, hidden 64, tied embeddings)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    }[kind]
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=None,
    )
    if kind == "gemma2":
        settings.update(head_dim=16, final_logit_softcapping=5.0, sliding_window=64)
    settings.update(config)
    torch.manual_seed(seed)
    return model_class(config_class(**settings))


def save_random_model(
    folder: Path, kind: str, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype = torch.float32, **config
) -> Path:
    """`random_model` sized to `tokenizer` (unless `config` sets vocab_size), saved in `dtype` with it as a HF
    folder."""
    model = random_model(kind, config.pop("vocab_size", len(tokenizer)), **config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)
