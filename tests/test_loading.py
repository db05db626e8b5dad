"""Model loading: aliases, folders, GGUF, errors, options."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserInputError
from models.loading import ALIASES, ModelSpec, load_model, load_tokenizer, resolve_model_path


def test_unknown_name_fails_in_one_line_listing_the_aliases():
    with pytest.raises(UserInputError) as error:
        resolve_model_path("no-such-model")
    message = str(error.value)
    assert "\n" not in message
    assert all(alias in message for alias in ALIASES)


def test_folder_without_config_and_missing_gguf_are_reported(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(UserInputError, match="does not exist"):
        resolve_model_path(str(tmp_path / "model.gguf"))


def test_unreachable_hub_id_fails_in_one_line():
    with pytest.raises(UserInputError) as error:
        load_tokenizer(ModelSpec(name="someone/not-a-model-xyz"))
    assert "someone/not-a-model-xyz" in str(error.value) and "\n" not in str(error.value)


def test_local_folder_loads_with_dtype_and_non_reentrant_checkpointing(tiny_llama):
    model = load_model(ModelSpec(name=str(tiny_llama), dtype="bfloat16", gradient_checkpointing=True))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    assert model.model.gradient_checkpointing
    assert model.config.use_cache is False
    tokenizer = load_tokenizer(ModelSpec(name=str(tiny_llama)))
    assert tokenizer.pad_token_id is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_quantization_without_cuda_is_a_clear_error(tiny_llama):
    with pytest.raises(UserInputError, match="needs a CUDA GPU"):
        load_model(ModelSpec(name=str(tiny_llama), quantization="nf4"))


def test_remote_code_is_off_by_default():
    assert ModelSpec().trust_remote_code is False


@pytest.mark.slow
def test_embedded_alias_resolves_to_a_cached_safetensors_folder():
    folder = resolve_model_path("smollm2-135m-instruct")
    assert resolve_model_path("smollm2-135m-instruct") == folder  # converted once, then cached
    from pathlib import Path

    files = {path.name for path in Path(folder).iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    tokenizer = load_tokenizer(ModelSpec())
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
