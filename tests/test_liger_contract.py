"""Liger's private `_apply_liger_kernel_to_instance` (models/liger.py calls it) checked against the installed
liger-kernel: the kernels it promises are patched into a real model, the loss and the forward are left alone.
A liger-kernel upgrade that renames it or changes what it patches fails here, not in a GPU run."""

from __future__ import annotations

import pytest
from transformers.models.llama import modeling_llama

from models.liger import apply_liger_kernels
from models.synthetic import random_model

pytest.importorskip(
    "liger_kernel", reason="liger-kernel is not installed (optional, for model.loss=liger): its contract is unchecked"
)


def test_the_instance_patch_swaps_in_liger_norms_mlps_and_rope_and_leaves_the_loss(monkeypatch):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    # RoPE is patched module-wide: restored after the test
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    class_forward = modeling_llama.LlamaForCausalLM.forward
    model = random_model("llama", 512)

    apply_liger_kernels(model)

    layers = model.model.layers
    norms = [model.model.norm, *(layer.input_layernorm for layer in layers)]
    norms += [layer.post_attention_layernorm for layer in layers]
    assert all(norm.forward.__func__ is LigerRMSNorm.forward for norm in norms)
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in layers)
    assert modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert modeling_llama.LlamaForCausalLM.forward is class_forward and "forward" not in vars(model)
