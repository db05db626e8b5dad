"""GPU settings exercised on the CPU: bf16-true / bf16-mixed precision end to end, and the QLoRA path (bitsandbytes
runs its NF4 kernels on the CPU; only the CUDA device choice is replaced)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, REPO, batch_of, load_frozen, run_dir, run_main, tiny_args
from lightning.pytorch.plugins.precision import HalfPrecision
from safetensors.torch import load_file

import models.loading
import models.training_model as training_model
from cli import build_cli
from core.errors import UserInputError
from evaluation.slot import optimise_deltas, prefill
from lightning_modules.finetune import CausalLMFineTuner
from models.head import OutputHead
from models.loading import ModelSpec
from tasks.planning import PlanningSpec

PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)


def test_slot_maths_ignore_autocast(tiny_llama):
    """Under bf16-mixed, SLOT's prefill runs in autocast; the delta optimisation stays fp32 / fp64."""
    model, tokenizer = load_frozen(tiny_llama)
    head = OutputHead(model)
    state = prefill(model, head, *batch_of(tokenizer, PROMPTS[:2]))
    expected, expected_trace = optimise_deltas(head, state, [3], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        deltas, trace = optimise_deltas(head, state, [3], lr=0.1)
    torch.testing.assert_close(trace, expected_trace, rtol=0, atol=0)
    torch.testing.assert_close(deltas[3], expected[3], rtol=0, atol=0)


def test_true_precision_loads_the_backbone_in_its_dtype(tiny_llama, monkeypatch):
    """precision bf16-true: the backbone is read in bf16, not read in fp32 and cast (no transient fp32 copy)."""
    asked = []
    real_load = models.loading.load_model
    monkeypatch.setattr(training_model, "load_model", lambda spec, empty: asked.append(spec.dtype) or real_load(spec))
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=PLANNING)
    with HalfPrecision("bf16-true").tensor_init_context():  # what Lightning wraps configure_model in
        module.configure_model()
    assert asked == ["bfloat16"]
    frozen = {p.dtype for p in module.model.parameters() if not p.requires_grad}  # PEFT keeps its own in fp32
    assert frozen == {torch.bfloat16}
    plain = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=PLANNING)
    plain.configure_model()  # 32-true and bf16-mixed keep the config's dtype
    assert asked == ["bfloat16", "float32"]


def test_qlora_without_cuda_is_one_clear_line(tiny_llama, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error")
    args = tiny_args(tiny_llama, tmp_path, "--config", str(REPO / "configs/presets/qlora.yaml"),
                     "--trainer.accelerator", "cpu")  # fmt: skip
    assert run_main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "mode: lora" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_fit_test_and_slot_in_bf16_on_cpu(precision, tiny_llama, tmp_path):
    weights_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--trainer.precision", precision)]) == 0
    run = run_dir(tmp_path)
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in checkpoint["state_dict"].values()} == {weights_dtype}
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["state_dict"].values())
    exported = load_file(run / "epoch_0/model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert {v.dtype for v in exported.values()} == {weights_dtype}  # the dtype the model was trained in

    test = build_cli(["test", *tiny_args(tiny_llama, tmp_path, "--trainer.precision", precision, "--ckpt_path",
                                         "last", "--data.test_limit", "4")])  # fmt: skip
    rows = [json.loads(line) for line in (run / "samples/test_step4.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert test.trainer.callback_metrics["test/accuracy"].item() == pytest.approx(
        statistics.mean(float(row["correct"]) for row in rows)
    )

    slot = build_cli(["test", "--config", str(REPO / "configs/slot.yaml"), "--model.init_args.backbone.name",
                      str(tiny_llama), "--trainer.logger.init_args.save_dir", str(tmp_path / "slot"),
                      "--trainer.enable_progress_bar", "false", "--trainer.precision", precision,
                      "--data.test_limit", "3", "--model.init_args.generation.max_new_tokens", "6"])  # fmt: skip
    folder = next((tmp_path / "slot/slot").glob("version_*/samples/test_step0"))
    summary = json.loads((folder / "summary.json").read_text())["arms"]
    for arm in ("log_times_0_lr_0.1", "log_times_5_lr_0.1"):
        losses = [json.loads(line)["slot_loss"] for line in (folder / f"{arm}.jsonl").read_text().splitlines()]
        assert len(losses) == 3 and all(len(trace) == (6 if "_5_" in arm else 1) for trace in losses)
        logged = slot.trainer.callback_metrics[f"test/{arm}/final_loss"].item()
        assert logged == pytest.approx(summary[arm]["mean_final_loss"], abs=1e-5)  # not rounded to bf16
    assert summary["log_times_5_lr_0.1"]["mean_final_loss"] < summary["log_times_0_lr_0.1"]["mean_final_loss"]


@pytest.mark.slow
def test_qlora_fit_on_cpu_with_real_nf4_weights(tiny_llama, tmp_path, monkeypatch):
    """The qlora preset end to end: NF4 base through bitsandbytes (its CPU kernels), LoRA + planning rows trained,
    trainable-only checkpoint, and an export that merges the adapters into the unquantised base."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(models.loading, "quantized_device_map", lambda spec: {"": "cpu"})  # CUDA's only role
    args = tiny_args(tiny_llama, tmp_path, "--config", str(REPO / "configs/presets/qlora.yaml"),
                     "--trainer.accelerator", "cpu", "--data.train_limit", "8",
                     "--model.init_args.optimizer.init_args.lr", "0.05")  # fmt: skip  # moves bf16 weights
    cli = build_cli(["fit", *args])
    assert isinstance(cli.model.model.base_model.model.model.layers[0].mlp.gate_proj.base_layer, bnb.nn.Linear4bit)
    run = run_dir(tmp_path)
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in key or "trainable_tokens" in key for key in state)
    base = load_file(Path(tiny_llama) / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    exported = load_file(run / "epoch_0/model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    prefix = "model.base_model.model.model.layers.0.mlp.gate_proj"
    a, b = state[f"{prefix}.lora_A.default.weight"].float(), state[f"{prefix}.lora_B.default.weight"].float()
    # the preset's dtype is bfloat16: W (rounded to bf16) + alpha / r * B A, summed in fp32, stored in bf16
    expected = (base.to(torch.bfloat16).float() + (16 / 16) * b @ a).to(torch.bfloat16)
    assert exported.dtype == torch.bfloat16 and (exported != base.to(torch.bfloat16)).float().mean() > 0.5
    assert (exported != expected).float().mean() < 0.01  # a rare rounding flip from another summation order
    torch.testing.assert_close(exported, expected)


def test_quantized_device_map_is_the_only_cuda_requirement(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error")
    with pytest.raises(UserInputError, match="needs a CUDA GPU"):
        models.loading.quantized_device_map(ModelSpec(name=str(tiny_llama), quantization="nf4"))
