"""generation.engine: vllm: one decoding formula for both engines, engine settings and refusals, and (when vLLM is
installed) the engine end to end against the HF engine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from core.errors import UserInputError
from evaluation.decoding import CorrectnessFirstProcessor, DecodingSpec, filter_rows, logits_processors
from evaluation.generation import GenerationSpec, VllmSettings

REPO = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")

# One spec per configs/decoding/*.yaml rule (and two knobs together): the study's knobs.
KNOBS = [
    DecodingSpec(),
    DecodingSpec(temperature=0.7),
    DecodingSpec(top_k=5),
    DecodingSpec(top_p=0.9),
    DecodingSpec(min_p=0.1),
    DecodingSpec(prob_threshold=0.02),
    DecodingSpec(hewitt_epsilon=0.02),
    DecodingSpec(temperature=0.6, hewitt_epsilon=0.001),
    DecodingSpec(greedy_threshold=0.3),
    DecodingSpec(edt_var=[2.0, 0.7, 0.8]),
    DecodingSpec(confidence_bin_only=2),
    DecodingSpec(dynamic_top_k=[1, 2, 2, 3, 4, 5, 6, 8, 10, 12]),
    DecodingSpec(cal_acc=[-0.1, 0.5, 0.05]),
    DecodingSpec(top_k=20, min_p=0.05),
]
HF_WARPERS = {"top_k": TopKLogitsWarper, "min_p": MinPLogitsWarper}


def model_like_logits(rows: int = 6, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    """Peaked and flat rows (top-1 probabilities from ~0.05 to ~0.99), as a model's next-token logits."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * torch.linspace(0.5, 4.0, rows)[:, None]
    logits[torch.arange(rows), torch.arange(rows)] += torch.linspace(0.0, 8.0, rows)
    return logits


def hf_engine_distribution(spec: DecodingSpec, logits: torch.Tensor) -> torch.Tensor:
    """What HF's `generate` samples from under `spec`: its own warper chain (from the GenerationConfig keywords)
    when `logits_processors` picks one, else the correctness-first processor."""
    kwargs, processors = logits_processors(spec)
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    if not processors:
        chain = LogitsProcessorList([TemperatureLogitsWarper(kwargs["temperature"])])
        if kwargs["top_k"]:
            chain.append(TopKLogitsWarper(kwargs["top_k"]))
        if kwargs["min_p"]:
            chain.append(MinPLogitsWarper(kwargs["min_p"]))
        if kwargs["epsilon_cutoff"]:
            chain.append(EpsilonLogitsWarper(kwargs["epsilon_cutoff"]))
        if kwargs["eta_cutoff"]:
            chain.append(EtaLogitsWarper(kwargs["eta_cutoff"]))
        processors = chain
    return processors(ids, logits.clone()).softmax(-1)


def test_filter_rows_gives_each_row_its_own_specs_result():
    logits = model_like_logits(rows=len(KNOBS) + 1)
    specs = [*KNOBS, None]
    out = filter_rows(specs, logits)
    for row, spec in enumerate(KNOBS):
        alone = CorrectnessFirstProcessor(spec)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1])
        assert torch.equal(out[row : row + 1], alone), spec
    assert torch.equal(out[-1], logits[-1])  # no spec: untouched
    assert torch.equal(filter_rows([None] * logits.shape[0], logits), logits)


def test_generation_engine_settings_are_checked():
    assert GenerationSpec().engine == "hf"
    with pytest.raises(UserInputError, match="generation.engine must be hf or vllm, got 'tgi'"):
        GenerationSpec(engine="tgi")
    with pytest.raises(UserInputError, match="gpu_memory_utilization must be in"):
        VllmSettings(gpu_memory_utilization=1.5)
    with pytest.raises(UserInputError, match="tensor_parallel_size must be an integer >= 1"):
        VllmSettings(tensor_parallel_size=0)
    with pytest.raises(UserInputError, match="dtype must be one of auto, float32, bfloat16, float16"):
        VllmSettings(dtype="fp8")


def test_engine_vllm_without_vllm_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UserInputError) as error:
        GenerationSpec(engine="vllm")
    assert str(error.value) == (
        "generation.engine=vllm needs vLLM, which is not installed: pip install -e '.[vllm]' (or use hf)"
    )


def vllm_spec(**overrides) -> GenerationSpec:
    """A GenerationSpec with engine vllm whether or not vLLM is installed (its check bypassed)."""
    spec = GenerationSpec(**overrides)
    spec.engine = "vllm"
    return spec


def test_slot_and_fit_refuse_engine_vllm(tiny_llama):
    from lightning_modules.finetune import CausalLMFineTuner
    from lightning_modules.slot_eval import SLOTEvaluator
    from models.loading import ModelSpec

    with pytest.raises(UserInputError, match=r"^SLOT \(model.generation\) generates with the HF engine only"):
        SLOTEvaluator(backbone=ModelSpec(name=str(tiny_llama)), generation=vllm_spec())
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="full", generation=vllm_spec())
    with pytest.raises(UserInputError, match="^fit's in-loop validation .* generates with the HF engine only"):
        module.setup("fit")
    module.setup("test")  # test and predict take vllm


def test_unknown_engine_setting_is_one_clear_error(tiny_llama, tmp_path, capsys):
    from cli import main

    args = ["test", "--config", str(REPO / "configs/decoding_gsm8k.yaml"),
            "--model.init_args.backbone.name", str(tiny_llama), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.generation.vllm.tensor_paralel_size", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "tensor_paralel_size" in err and "Traceback" not in err
