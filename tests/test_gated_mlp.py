"""Lean gated MLPs (models/gated_mlp.py): the model's own forward values bit for bit and its gradients, with one
[tokens, intermediate] tensor per layer fewer kept for backward; `fit` switches its model to them."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build_tiny_model
from peft import LoraConfig, get_peft_model

from lightning_modules.finetune import CausalLMFineTuner
from models.gated_mlp import gated_mlp_forward, use_lean_gated_mlps
from models.loading import ModelSpec

VOCAB = 512
BATCH, LENGTH = 2, 24


LORA_TARGETS = {"lora": ["q_proj", "gate_proj", "down_proj"], "lora-mlp": ["gate_proj", "down_proj"]}


def tiny(kind: str, mode: str) -> torch.nn.Module:
    """A tiny model, every weight trained (full) or LoRA adapters (up_proj frozen either way)."""
    model = build_tiny_model(kind, VOCAB)
    if mode in LORA_TARGETS:
        config = LoraConfig(r=4, target_modules=LORA_TARGETS[mode], lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, config)
    return model.train()


def step(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients of the trainable weights, and the bytes of the distinct tensors autograd kept for backward."""
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])  # SiLU (SwiGLU) and tanh-GELU (GeGLU, Gemma 2)
@pytest.mark.parametrize(
    ("mode", "layers_saving"),
    # lora-mlp: nothing before layer 0's MLP trains, so its `up` needs no gradient and autograd keeps only `up`
    # for the product there already; from layer 1 on, act(gate) is kept too (the model's own code)
    [("full", "all"), ("lora", "all"), ("lora-mlp", "all but the first")],
)
def test_lean_mlps_equal_the_models_own_and_keep_one_tensor_fewer_per_layer(
    kind: str, mode: str, layers_saving: str
) -> None:
    torch.manual_seed(0)
    reference = tiny(kind, mode)
    lean = copy.deepcopy(reference)
    assert use_lean_gated_mlps(lean) == reference.config.num_hidden_layers
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))

    loss, grads, kept = step(reference, input_ids)
    lean_loss, lean_grads, lean_kept = step(lean, input_ids)

    assert torch.equal(lean_loss, loss)  # the same forward computation
    assert lean_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    config = reference.config
    activation_output = BATCH * LENGTH * config.intermediate_size * 4  # act(gate) in fp32, no longer kept
    layers = config.num_hidden_layers - (layers_saving == "all but the first")
    assert kept - lean_kept == layers * activation_output


def test_lean_mlps_under_gradient_checkpointing_give_the_same_gradients() -> None:
    torch.manual_seed(0)
    reference = tiny("llama", "lora")
    lean = copy.deepcopy(reference)
    use_lean_gated_mlps(lean)
    lean.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    loss, grads, _ = step(reference, input_ids)
    lean_loss, lean_grads, _ = step(lean, input_ids)
    assert torch.equal(lean_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lean_mlps_leave_inference_and_other_blocks_alone() -> None:
    model = build_tiny_model("llama", VOCAB).eval()
    input_ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        use_lean_gated_mlps(model)
        assert torch.equal(model(input_ids=input_ids).logits, expected)
    assert use_lean_gated_mlps(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


@pytest.mark.parametrize("loss", ["chunked", "hf"])
def test_fit_builds_its_model_with_lean_mlps(tiny_llama, loss: str) -> None:
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora", loss=loss)
    module.configure_model()
    blocks = [m for m in module.model.modules() if type(m).__name__.endswith("MLP")]
    assert blocks and all(block.forward.__func__ is gated_mlp_forward for block in blocks)
