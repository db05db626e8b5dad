"""Added-token vocabulary: tokenizer tokens, embedding rows and their initialisation, PEFT trainable tokens.

New ids come from the tokenizer (`len(tokenizer)` before adding), never from the embedding matrix: some
models (Qwen2.5) ship a matrix with more rows than the vocabulary, so sizing from the matrix would put new
ids on rows that already exist (the upstream bug). The matrix grows only when the tokenizer outgrows it.
"""

from __future__ import annotations

import zlib

import torch
from peft import TrainableTokensConfig
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.errors import UserInputError


def add_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[str]:
    """Add `tokens` (plain, not special: decoding keeps them); return those that were not there yet."""
    missing = [token for token in tokens if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in missing])
    return missing


def resize_and_initialise(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    key_tokens: dict[str, list[str]],
    init_words: dict[str, str | None],
    new: set[str],
    spread: float = 0.0,
) -> list[int]:
    """Make room for the tokenizer's added tokens and initialise the rows of the `new` ones (input embedding
    and, when untied, lm_head) from the embedding of their key's word (mean over the word's pieces); keys
    without a word get the mean row of the original vocabulary. With `spread` > 0, every token of a key after
    its first adds a perturbation seeded by the token's string (the same on every run and process) of
    `spread` x each coordinate's std over the vocabulary, so the rows of one key start distinct. Tokens the
    backbone's own tokenizer already had (an export) keep their trained rows. Returns the ids of every
    planning token, in order."""
    ids = [tokenizer.convert_tokens_to_ids(token) for tokens in key_tokens.values() for token in tokens]
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if not new:
        return ids
    base_vocabulary = min(tokenizer.convert_tokens_to_ids(token) for token in new)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for matrix in matrices:
            scale = spread * matrix[:base_vocabulary].float().std(0) if spread else 0.0  # per coordinate
            for key, tokens in key_tokens.items():
                word = init_words.get(key)
                pieces = tokenizer(word, add_special_tokens=False).input_ids if word else []
                pieces = [piece for piece in pieces if piece < base_vocabulary]
                source = (matrix[pieces] if pieces else matrix[:base_vocabulary]).float().mean(0)
                for index, token in enumerate(tokens):
                    if token not in new:
                        continue
                    row = source
                    if index and spread:
                        generator = torch.Generator().manual_seed(zlib.crc32(token.encode()))
                        row = source + scale * torch.randn(source.shape, generator=generator)
                    matrix[tokenizer.convert_tokens_to_ids(token)] = row.to(matrix.dtype)
    return ids


def untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give a model whose lm_head shares the input embedding matrix its own copy of it (the config then says
    untied, so exports save and reload both); a model already untied is left as it is."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight is not embedding.weight:
        return
    for config in {id(model.config): model.config, id(text := model.config.get_text_config()): text}.values():
        config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
    output.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)


def trainable_token_targets(model: PreTrainedModel, ids: list[int]) -> dict[str, list[int]]:
    """PEFT trainable-token targets for `ids`: the input embedding (its tied lm_head follows it), plus the
    lm_head rows when the output embedding is a separate matrix."""
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[embedding]: list(ids)}
    if output is not None and output.weight is not embedding.weight:
        if not isinstance(output, torch.nn.Linear) or output.bias is not None:
            raise UserInputError("prompt-tuning needs a bias-free linear lm_head; use mode full or lora")
        targets[names[output]] = list(ids)
    return targets


def prompt_tuning_config(model: PreTrainedModel, ids: list[int]) -> TrainableTokensConfig:
    """Only the rows of `ids` train (input embedding and lm_head), everything else frozen."""
    targets = trainable_token_targets(model, ids)
    return TrainableTokensConfig(token_indices=list(ids), target_modules=list(targets))
