"""Methods compose: every kind of checkpoint x every evaluation path, on tiny models.

Checkpoints: the base model, a LoRA export, a LoRA + planning-token export, an adapter-only export and a Lightning
checkpoint (with planning tokens). Paths: `test` (the one evaluation path), SLOT (iters 0 and 5), `predict` with
repeats, `dynamics` (checkpoints swapped into one base) and `traces`. For each: the prompt ids equal those fit's
validation used, planning tokens never reach the scorer, and SLOT with 0 iterations gives exactly `test`'s
completions.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from helpers import run_dir, run_main, tiny_args

import evaluation.pipeline as pipeline
from commands.traces import traces
from datamodules.reasoning import ReasoningDataModule
from evaluation.decoding import DecodingSpec
from evaluation.generation import GenerationSpec
from evaluation.pipeline import evaluate_batch
from evaluation.slot import SlotArm
from lightning_modules.finetune import CausalLMFineTuner
from lightning_modules.slot_eval import SLOTEvaluator
from models.checkpoints import Checkpoint, CheckpointModels
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.planning import PlanningSpec

pytestmark = pytest.mark.slow  # three short fits through the CLI

PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)  # configs/planning_gsm8k.yaml's
NO_PLANNING = PlanningSpec()
GREEDY = GenerationSpec(max_new_tokens=6)
DATA = {"train_limit": 8, "val_size": 3, "test_limit": 3, "eval_batch_size": 3, "max_length": 1024}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Three short fits: LoRA (no planning), LoRA + planning tokens, and the same with adapter-only exports."""
    root = tmp_path_factory.mktemp("composition")
    short = ["--trainer.max_steps", "2", "--data.train_limit", "8", "--data.val_size", "3"]
    fits = {
        "lora": ["--model.init_args.mode", "lora", "--model.init_args.planning.method", "none"],
        "planning": [],
        "adapter": ["--export.adapter_only", "true"],
    }
    for name, extra in fits.items():
        assert run_main(["fit", *tiny_args(tiny_llama, root / name, *short, *extra)]) == 0
    return {name: run_dir(root / name) for name in fits}


def kinds(runs: dict[str, Path]) -> dict[str, tuple[str | None, PlanningSpec, str]]:
    """checkpoint kind -> (path, the planning tokens it was trained with, its kind for `dynamics`)."""
    return {
        "base": (None, NO_PLANNING, "base"),
        "lora export": (str(runs["lora"] / "epoch_0"), NO_PLANNING, "export"),
        "lora+planning export": (str(runs["planning"] / "epoch_0"), PLANNING, "export"),
        "adapter-only export": (str(runs["adapter"] / "epoch_0"), PLANNING, "export"),
        "lightning ckpt": (str(runs["planning"] / "checkpoints/last.ckpt"), PLANNING, "lightning"),
    }


def datamodule(tokenizer, planning: PlanningSpec, stage: str) -> ReasoningDataModule:
    data = ReasoningDataModule(tokenizer=tokenizer, planning=planning, **DATA)
    data.setup(stage)
    return data


def fit_validation_prompts(backbone: ModelSpec, planning: PlanningSpec) -> list[list[int]]:
    """The validation prompt ids of `fit` with these planning tokens (the fine-tuner's own tokenizer)."""
    mode = "lora+prompt-tuning" if planning.active else "lora"
    module = CausalLMFineTuner(backbone=backbone, mode=mode, planning=planning)
    return datamodule(module.tokenizer, module.planning, "fit").splits["val"]["prompt_ids"]


@pytest.fixture
def scored_texts(monkeypatch) -> list[str]:
    """Every text the answer scorer receives."""
    seen: list[str] = []
    score = pipeline.score_completion

    def spy(answer_format: str, text: str, gold: str):
        seen.append(text)
        return score(answer_format, text, gold)

    monkeypatch.setattr(pipeline, "score_completion", spy)
    return seen


def favour_token(model, token_id: int):
    """A hook making `token_id` the most likely next token everywhere (the model then emits planning tokens)."""

    def hook(module, args, output):
        output = output.clone()
        output[..., token_id] += 50.0
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize(
    "kind", ["base", "lora export", "lora+planning export", "adapter-only export", "lightning ckpt"]
)
def test_every_checkpoint_kind_through_every_evaluation_path(kind, runs, tiny_llama, tmp_path, scored_texts):
    backbone = ModelSpec(name=str(tiny_llama))
    checkpoint, planning, dynamics_kind = kinds(runs)[kind]
    trained = load_trained(backbone, checkpoint)
    assert trained.planning.key_tokens() == planning.key_tokens()

    # prompts: the planning prefix the run trained with, token for token as fit's validation
    val = datamodule(trained.tokenizer, trained.planning, "fit").splits["val"]["prompt_ids"]
    assert val == fit_validation_prompts(backbone, planning)
    data = datamodule(trained.tokenizer, trained.planning, "test")
    batch = next(iter(data.test_dataloader()))

    # test, and SLOT with 0 and 5 iterations: the same prompts, iters 0 exactly test's completions
    tested = evaluate_batch(trained.model, trained.tokenizer, batch, GREEDY, trained.planning)
    slot = SLOTEvaluator(backbone, checkpoint, arms=[SlotArm(iters=0), SlotArm(iters=5)], generation=GREEDY)
    assert slot.planning.key_tokens() == planning.key_tokens()
    slot.test_step(batch, 0)
    by_arm = {arm.name: [row for row in slot.stage_rows if row.arm == arm.name] for arm in slot.arms}
    baseline, optimised = by_arm.values()
    assert [row.completions for row in baseline] == [row.completions for row in tested]
    assert [row.extra["slot_loss"][-1] < row.extra["slot_loss"][0] for row in optimised] == [True] * 3

    # predict with repeats: n samples per question, scored without planning tokens
    torch.manual_seed(0)
    sampling = GenerationSpec(max_new_tokens=6, repeats=3, at_k=[1, 3], decoding=DecodingSpec(temperature=1.0))
    predicted = evaluate_batch(trained.model, trained.tokenizer, batch, sampling, trained.planning)
    assert [len(row.completions) for row in predicted] == [3, 3, 3]
    assert all(set(row.metrics) == {"maj@1", "pass@1", "maj@3", "pass@3"} for row in predicted)
    if planning.active:  # make the model emit planning tokens: none may reach the scorer
        scored_texts.clear()
        token_id = trained.tokenizer.convert_tokens_to_ids(planning.tokens()[0])
        handles = [favour_token(model, token_id) for model in (trained.model, slot.model)]
        try:
            emitted = evaluate_batch(trained.model, trained.tokenizer, batch, sampling, trained.planning)
            slot.stage_rows = []
            slot.test_step(batch, 0)
        finally:
            for handle in handles:
                handle.remove()
        assert all(planning.tokens()[0] in text for row in emitted for text in row.completions)
        assert all(planning.tokens()[0] in row.completions[0] for row in slot.stage_rows)
        assert scored_texts and not any(token in text for text in scored_texts for token in planning.tokens())

    # dynamics: the checkpoint as the offline command scores it is the loader's model
    name = "base_model" if checkpoint is None else Path(checkpoint).name
    entry = Checkpoint(name, 1, Path(checkpoint) if checkpoint else None, dynamics_kind)
    ids = torch.tensor([val[0]])
    with CheckpointModels(backbone).model(entry) as scored_model:
        torch.testing.assert_close(scored_model(ids).logits, trained.model(ids).logits, rtol=1e-5, atol=1e-5)

    # traces: the gold ids come from the checkpoint's own tokenizer
    output = traces(tmp_path / "traces.jsonl.gz", model=backbone, checkpoint=checkpoint, limit=2, k=3)
    lines = [json.loads(line) for line in gzip.open(output, "rt")]
    assert lines and all(0 <= line["gt"] < len(trained.tokenizer) for line in lines)
