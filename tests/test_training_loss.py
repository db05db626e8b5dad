"""The fine-tuning loss: response-only chunked head + cross-entropy equals the model's own `labels=` loss (value and
gradients), with PEFT wrappers and gradient checkpointing; packed rows equal unpacked ones; the `loss` switch."""

from __future__ import annotations

import sys
import types
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, build_tiny_model
from peft import LoraConfig, get_peft_model

from cli import build_cli
from core.errors import UserInputError
from datamodules.batching import collate, pack_collate, pack_rows
from evaluation.teacher_forcing import response_loss
from lightning_modules.finetune import CausalLMFineTuner
from models.head import OutputHead
from models.liger import apply_liger_kernels, check_liger
from models.loading import ModelSpec
from models.packed_attention import PACKED_SDPA, use_packed_attention

VOCAB = 512


def features(lengths: list[tuple[int, int]], seed: int = 1) -> list[dict]:
    """Examples of (prompt, response) lengths: random ids, the prompt unlabelled (-100), the response labelled."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, response in lengths:
        ids = torch.randint(3, VOCAB, (prompt + response,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def tiny(kind: str, mode: str):
    """A tiny model wrapped for `mode`: full (every weight trains), lora (MLP adapters), lora+tokens (adapters
    plus PEFT trainable-token rows of the embedding and, untied, of lm_head)."""
    overrides = {"tie_word_embeddings": False} if kind == "qwen2" else {}
    model = build_tiny_model(kind, VOCAB, **overrides)
    if mode == "full":
        return model.train()
    targets = {"embed_tokens": [5, 7, 11]} | ({"lm_head": [5, 7, 11]} if kind == "qwen2" else {})
    config = LoraConfig(
        r=4,
        target_modules=["gate_proj", "down_proj", "q_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,  # non-zero B: the adapters change the loss, so their gradients are tested
        trainable_token_indices=targets if mode == "lora+tokens" else None,
    )
    peft_model = get_peft_model(model, config)
    for name, parameter in peft_model.named_parameters():  # move the new rows away from the base rows
        if "trainable_tokens_delta" in name:
            parameter.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return peft_model.train()


def fine_tuner(folder, model, loss: str) -> CausalLMFineTuner:
    """Our LightningModule with `loss`, holding `model` (its tokenizer read from `folder`)."""
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(folder)), mode="lora", loss=loss)
    module.model = model
    return module


def loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same(expected: tuple, actual: tuple) -> None:
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-5)
    assert actual[1].keys() == expected[1].keys() and expected[1]
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("mode", ["full", "lora", "lora+tokens"])
def test_chunked_loss_and_gradients_equal_the_models_own_labels_loss(kind: str, mode: str) -> None:
    model = tiny(kind, mode)
    batch = collate(features([(5, 9), (3, 4), (7, 12)]), pad_id=2)
    if mode == "lora+tokens":  # the trainable rows appear in the inputs and as targets
        batch["input_ids"][0, 2], batch["input_ids"][1, 4], batch["labels"][1, 4] = 5, 7, 7
    expected = loss_and_grads(model, lambda: model(**batch).loss)
    head_calls = []
    handle = OutputHead(model.get_base_model() if mode != "full" else model).layer.register_forward_hook(
        lambda module, args, output: head_calls.append(args[0].shape[0])
    )
    actual = loss_and_grads(model, lambda: response_loss(model, **batch, chunk_tokens=4))
    handle.remove()
    assert_same(expected, actual)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert head_calls == [4] * (labelled // 4) + ([labelled % 4] if labelled % 4 else [])  # labelled rows only


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    model = tiny("llama", "lora+tokens")
    batch = collate(features([(5, 9), (3, 4)]), pad_id=2)
    expected = loss_and_grads(model, lambda: model(**batch).loss)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    actual = loss_and_grads(model, lambda: response_loss(model, **batch))
    assert_same(expected, actual)


def test_pack_rows_is_first_fit_decreasing() -> None:
    # by hand: 7 -> row 0 (room 3), 5 -> row 1 (room 5), 4 -> row 1 (room 1), 3 -> row 0 (room 0), 2 -> row 2
    assert pack_rows([3, 7, 2, 5, 4], capacity=10) == [[1, 0], [3, 4], [2]]
    assert pack_rows([4, 4], capacity=4) == [[0], [1]]


def test_a_packed_batch_has_per_example_positions_and_no_label_across_examples() -> None:
    rows = features([(2, 3), (0, 3), (3, 1)])  # lengths 5, 3, 4; the second one labelled from its first token
    batch = pack_collate(rows, pad_id=2, capacity=8)  # 5 -> row 0, 4 -> row 1, 3 -> row 0: [0, 1] and [2]
    assert batch["input_ids"].tolist() == [rows[0]["input_ids"] + rows[1]["input_ids"], rows[2]["input_ids"] + [2] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert (
        batch["labels"].tolist()
        == [
            [-100, -100]
            + rows[0]["input_ids"][2:]
            + [-100]
            + rows[1]["input_ids"][1:],  # nothing predicts a first token
            [-100] * 3 + rows[2]["input_ids"][3:] + [-100] * 4,
        ]
    )


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("loss", ["chunked", "hf"])
@pytest.mark.parametrize("attention", ["sdpa", PACKED_SDPA])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(tiny_llama, kind: str, loss: str, attention: str) -> None:
    """Transformers' sdpa (a block-diagonal mask over each row) and ours (example by example) both give the
    unpacked loss and gradients; ours runs attention only over each example's own tokens."""
    model = tiny(kind, "lora")
    rows = features([(4, 6), (1, 3), (6, 2), (2, 9), (3, 3)], seed=4)
    packed = pack_collate(rows, pad_id=2, capacity=20)
    assert len(packed["input_ids"]) < len(rows)  # several examples share a row
    module = fine_tuner(tiny_llama, model, loss)
    expected = loss_and_grads(model, lambda: model(**collate(rows, pad_id=2)).loss)  # unpacked, HF's own loss
    if attention == PACKED_SDPA:
        use_packed_attention(model.get_base_model())
    lengths: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    with patch.object(F, "scaled_dot_product_attention", recording):
        actual = loss_and_grads(model, lambda: module._loss(packed)[0])
    assert_same(expected, actual)
    assert int(module._loss(packed)[1]) == sum(len(r["labels"]) - r["labels"].count(-100) for r in rows)
    if attention == PACKED_SDPA and kind == "llama":  # (tiny gemma2 runs eager attention: not switched)
        width, real = packed["input_ids"].shape[1], packed["attention_mask"].sum(1).tolist()
        segments = [len(r["input_ids"]) for r in rows] + [width - n for n in real if n < width]  # padding: its own
        assert sorted(lengths) == sorted(segments * model.config.num_hidden_layers)


def test_loss_switch_hf_runs_the_head_over_every_position(tiny_llama) -> None:
    batch = collate(features([(5, 9), (3, 4)]), pad_id=2)
    seen = {}
    for loss in ("hf", "chunked"):
        module = fine_tuner(tiny_llama, tiny("llama", "lora"), loss)
        calls: list[tuple] = []
        hook = module.model.get_base_model().lm_head.register_forward_hook(
            lambda m, a, o, calls=calls: calls.append(tuple(a[0].shape))
        )
        seen[loss] = (module._loss(batch)[0].detach(), calls)
        hook.remove()
    torch.testing.assert_close(seen["chunked"][0], seen["hf"][0], rtol=0, atol=1e-5)
    assert seen["hf"][1] == [(2, 14, 64)]  # every position of the padded batch
    assert seen["chunked"][1] == [(13, 64)]  # the 13 labelled tokens only (9 + 4)


# --- Liger: the plumbing, with the kernel replaced by a reference implementation in torch ---------------------


class FakeLigerLoss:
    """What liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss computes (documented API), in torch."""

    def __init__(self, ignore_index=-100, reduction="mean", softcap=None):
        self.reduction, self.softcap = reduction, softcap

    def __call__(self, lin_weight, _input, target, bias=None):
        logits = F.linear(_input, lin_weight, bias).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, target, reduction=self.reduction)


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []
    package, transformers_ = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    package.__spec__ = transformers_.__spec__ = types.SimpleNamespace(name="liger_kernel")
    transformers_.LigerFusedLinearCrossEntropyLoss = FakeLigerLoss
    transformers_._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    package.transformers = transformers_
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "liger_kernel" else None)
    return calls


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_liger_loss_gets_the_head_weight_labelled_states_and_softcap(fake_liger, kind: str) -> None:
    model = tiny(kind, "lora")
    batch = collate(features([(5, 9), (3, 4)]), pad_id=2)
    expected = loss_and_grads(model, lambda: model(**batch).loss)
    actual = loss_and_grads(model, lambda: response_loss(model, **batch, fused=True))
    assert_same(expected, actual)


def test_liger_kernels_are_applied_to_the_model_instance(fake_liger) -> None:
    model = build_tiny_model("llama", VOCAB)
    apply_liger_kernels(model)
    assert fake_liger == [
        {
            "model": model,
            "rope": True,
            "rms_norm": True,
            "swiglu": True,
            "geglu": True,
            "cross_entropy": False,
            "fused_linear_cross_entropy": False,
        }
    ]


def test_liger_without_cuda_or_without_the_package_is_one_clear_error(fake_liger, monkeypatch) -> None:
    with pytest.raises(UserInputError, match="needs a CUDA device, this run is on cpu"):
        check_liger(torch.device("cpu"))
    check_liger(torch.device("cuda"))  # installed and on CUDA: accepted
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserInputError, match="needs the liger-kernel package"):
        check_liger(torch.device("cuda"))


def test_liger_refuses_a_peft_wrapped_lm_head(fake_liger) -> None:
    model = tiny("qwen2", "lora+tokens")
    batch = collate(features([(5, 9)]), pad_id=2)
    with pytest.raises(UserInputError, match="needs a plain lm_head"):
        response_loss(model, **batch, fused=True)


def test_loss_liger_on_a_cpu_run_stops_before_loading_anything(tiny_llama, fake_liger, monkeypatch) -> None:
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora", loss="liger")
    with pytest.raises(UserInputError, match="needs a CUDA device, this run is on cpu"):
        module.configure_model()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserInputError, match="needs the liger-kernel package"):
        module.configure_model()
    assert module.model is None and fake_liger == []


@pytest.mark.slow
def test_the_loss_and_packing_switches_are_config_keys(capsys) -> None:
    args = ["fit", "--config", str(REPO / "configs/planning_gsm8k.yaml"), "--print_config"]
    with pytest.raises(SystemExit):
        build_cli([*args, "--model.init_args.loss", "hf", "--data.packing", "true"])
    out = capsys.readouterr().out
    assert "loss: hf" in out and "packing: true" in out
    with pytest.raises(SystemExit):
        build_cli(args)
    out = capsys.readouterr().out
    assert "loss: chunked" in out and "packing: false" in out  # the defaults
