"""The model factory of fine-tuning (`models/training_model.py`), used without Lightning, and the module's
`configure_model` building exactly what it builds."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserInputError
from lightning_modules.finetune import CausalLMFineTuner
from models.adapters import LoraSpec, planning_tokenizer
from models.gated_mlp import gated_mlp_forward
from models.loading import ModelSpec
from models.packed_attention import PACKED_SDPA
from models.training_model import build_training_model, training_backbone
from tasks.planning import PlanningSpec

PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)


def build(folder, mode: str = "lora+prompt-tuning", loss: str = "chunked") -> tuple[torch.nn.Module, object]:
    backbone = ModelSpec(name=str(folder))
    tokenizer, new_tokens = planning_tokenizer(backbone, PLANNING)
    model = build_training_model(backbone, mode, LoraSpec(), PLANNING, loss, tokenizer, set(new_tokens))
    return model, tokenizer


def test_the_backbone_dtype_follows_true_precision_unless_quantised():
    backbone = ModelSpec(name="x")
    assert training_backbone(backbone, torch.float32) == backbone
    assert training_backbone(backbone, torch.bfloat16).dtype == "bfloat16"
    assert training_backbone(backbone, torch.float16).dtype == "float16"
    quantised = ModelSpec(name="x", quantization="nf4")
    assert training_backbone(quantised, torch.bfloat16) == quantised


def test_the_factory_builds_a_trainable_model_without_lightning(tiny_llama):
    model, tokenizer = build(tiny_llama)
    assert model.training and all(module.training for module in model.modules())
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)  # room for the planning tokens
    mlps = [module for module in model.modules() if type(module).__name__.endswith("MLP")]
    assert mlps and all(mlp.forward.__func__ is gated_mlp_forward for mlp in mlps)
    assert model.base_model.model.config._attn_implementation == PACKED_SDPA


def test_the_factory_loads_in_the_default_dtype_of_true_precision(tiny_llama):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true does while configure_model runs
    try:
        model, _ = build(tiny_llama, mode="lora")
    finally:
        torch.set_default_dtype(previous)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_the_liger_loss_is_refused_on_the_cpu_in_one_line(tiny_llama):
    with pytest.raises(UserInputError, match="^model.loss=liger needs "):
        build(tiny_llama, loss="liger")


def test_configure_model_builds_what_the_factory_builds(tiny_llama):
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=PLANNING)
    torch.manual_seed(0)  # LoRA's A matrices are drawn at random
    module.configure_model()
    torch.manual_seed(0)
    model, _ = build(tiny_llama)
    expected = model.state_dict()
    assert module.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in module.model.state_dict().items())
