"""Model loading: aliases, folders, GGUF, errors, options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import UserInputError
from models import loading
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


def test_remote_code_is_off_unless_asked(tiny_llama, monkeypatch):
    """What `load_model` / `load_tokenizer` pass to transformers: trust_remote_code=False by default, True only
    when the spec asks (transformers would otherwise ask on stdin or run the hub's code)."""
    passed = []

    def spy(original):
        def from_pretrained(*args, **kwargs):
            passed.append((original.__self__.__name__, kwargs["trust_remote_code"]))
            return original(*args, **kwargs)

        return from_pretrained

    for auto in (loading.AutoModelForCausalLM, loading.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", spy(auto.from_pretrained))
    load_model(ModelSpec(name=str(tiny_llama)))
    load_tokenizer(ModelSpec(name=str(tiny_llama)))
    load_model(ModelSpec(name=str(tiny_llama), trust_remote_code=True))
    assert passed == [("AutoModelForCausalLM", False), ("AutoTokenizer", False), ("AutoModelForCausalLM", True)]


@pytest.mark.slow
def test_embedded_alias_resolves_to_a_cached_safetensors_folder(monkeypatch):
    folder = Path(resolve_model_path("smollm2-135m-instruct"))  # converted here, or by an earlier run
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    weights = (folder / "model.safetensors").stat()

    def reconvert(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", reconvert)
    assert Path(resolve_model_path("smollm2-135m-instruct")) == folder  # the cached folder, not converted again
    again = (folder / "model.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    tokenizer = load_tokenizer(ModelSpec())
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
