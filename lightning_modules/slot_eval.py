"""`cli.py test --config configs/slot.yaml`: baseline and SLOT arms on the same questions, in one run."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from lightning import LightningModule
from torch import nn
from torchmetrics import MeanMetric

from core.errors import UserInputError
from evaluation.generation import GenerationSpec, generate
from evaluation.slot import SlotArm, cache_copy, head_input_hook, optimise_deltas, prefill
from models.head import OutputHead
from models.loader import load_finetuned_model
from models.loading import ModelSpec, load_tokenizer
from tasks.scoring import score_completion

R1_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"


class SLOTEvaluator(LightningModule):
    """Evaluates arms of SLOT (iters 0 = the baseline) on the test questions; one shared prefill per batch.

    Args:
        backbone: the base model (alias, folder, GGUF file or hub id) and how to load it.
        checkpoint: a fine-tuned model to evaluate instead: an `epoch_N/` export or a Lightning
            checkpoint of `cli.py fit` on `backbone`. None = `backbone` itself.
        arms: the settings compared; each writes `log_times_<iters>_lr_<lr>.jsonl`.
        generation: decoding after the optimisation (the seed: greedy, 512 new tokens).
        format_pattern: a completion (stripped) that fully matches this regex counts as well formatted.
    """

    def __init__(
        self,
        backbone: ModelSpec | None = None,
        checkpoint: str | None = None,
        arms: list[SlotArm] | None = None,
        generation: GenerationSpec | None = None,
        format_pattern: str = R1_FORMAT,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, self.checkpoint = backbone or ModelSpec(), checkpoint
        self.arms = arms if arms is not None else [SlotArm(iters=0), SlotArm(iters=5)]
        if not self.arms or len({arm.name for arm in self.arms}) != len(self.arms):
            raise UserInputError("model.arms must list at least one arm, each with different settings")
        self.generation = generation or GenerationSpec(max_new_tokens=512)
        if self.generation.repeats != 1:
            raise UserInputError("model.generation.repeats: SLOT arms generate one completion per question (use 1)")
        self.format_pattern = re.compile(format_pattern, re.DOTALL)
        exported = (
            checkpoint is not None and Path(checkpoint).is_dir() and (Path(checkpoint) / "tokenizer.json").exists()
        )
        self.tokenizer = load_tokenizer(replace(self.backbone, name=checkpoint) if exported else self.backbone)
        self.model, self.head = None, None
        self.metrics = nn.ModuleDict(
            {
                f"arm{index}": nn.ModuleDict(
                    {key: MeanMetric() for key in ("accuracy", "format_accuracy", "final_loss")}
                )
                for index in range(len(self.arms))
            }
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = load_finetuned_model(self.backbone, self.checkpoint)
        self.model = model.requires_grad_(False).eval()  # frozen: SLOT computes no weight gradient
        self.head = OutputHead(self.model)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        state = prefill(self.model, self.head, batch["prompt_ids"], batch["prompt_mask"])
        by_lr = defaultdict(list)
        for index, arm in enumerate(self.arms):
            by_lr[arm.lr].append((index, arm))
        rows = []
        for lr, arms in by_lr.items():
            deltas, trace = optimise_deltas(self.head, state, sorted({arm.iters for _, arm in arms}), lr)
            for index, arm in arms:
                with head_input_hook(self.head, deltas[arm.iters]):
                    completions = generate(
                        self.model,
                        self.tokenizer,
                        batch["prompt_ids"],
                        batch["prompt_mask"],
                        self.generation,
                        past_key_values=cache_copy(state.cache),
                    )
                arm_rows = self._rows(batch, arm, completions, trace[:, : arm.iters + 1])
                self._log_arm(index, arm, arm_rows)
                rows.extend(arm_rows)
        return {"rows": rows}

    def _rows(self, batch: dict, arm: SlotArm, completions: list[str], losses: torch.Tensor) -> list[dict]:
        rows = []
        for i, completion in enumerate(completions):
            prediction, correct = score_completion(batch["answer_format"], completion, batch["answer"][i])
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
            rows.append(
                {
                    "arm": arm.name,
                    "id": batch["id"][i],
                    "question": batch["question"][i],
                    "prompt": self.tokenizer.decode(prompt),
                    "completion": completion,
                    "prediction": prediction,
                    "answer": batch["answer"][i],
                    "correct": correct,
                    "format_ok": bool(self.format_pattern.fullmatch(completion.strip())),
                    "slot_loss": [round(value, 6) for value in losses[i].tolist()],
                }
            )
        return rows

    def _log_arm(self, index: int, arm: SlotArm, rows: list[dict]) -> None:
        metrics = self.metrics[f"arm{index}"]
        values = {
            "accuracy": [float(row["correct"]) for row in rows],
            "format_accuracy": [float(row["format_ok"]) for row in rows],
            "final_loss": [row["slot_loss"][-1] for row in rows],
        }
        for key, value in values.items():
            metrics[key].update(torch.tensor(value, device=self.device))
            self.log(f"test/{arm.name}/{key}", metrics[key], batch_size=len(rows))
