"""`cli.py test --config configs/slot.yaml`: baseline and SLOT arms on the same questions, in one run."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import asdict

from lightning import LightningModule

from core.errors import UserInputError
from evaluation.generation import GenerationSpec
from evaluation.pipeline import evaluate_batch, one_question_batches
from evaluation.rows import EvaluationRow, gather_rows, logged_metrics
from evaluation.slot import SlotArm, cache_copy, head_input_hook, optimise_deltas, prefill
from models.head import OutputHead
from models.loader import load_trained
from models.loading import ModelSpec

log = logging.getLogger(__name__)

R1_FORMAT = r"^<think>.*?</think><answer>.*?</answer>$"
"""The reference's format check (`re.match`, DOTALL, on the completion as decoded: no strip, no space between tags)."""
R1_FORMAT_LENIENT = r"<think>.*?</think>\s*<answer>.*?</answer>"
"""Ours, reported beside it as `format_accuracy_lenient`: the stripped completion, whitespace allowed between tags."""


LENIENT_FORMAT = re.compile(R1_FORMAT_LENIENT, re.DOTALL)


def format_checks(pattern: re.Pattern, completion: str) -> dict[str, bool]:
    """`format_ok`: `pattern` matches the completion as decoded from its start (the reference's `re.match`);
    `format_ok_lenient`: the stripped completion fully matches `R1_FORMAT_LENIENT`."""
    return {
        "format_ok": bool(pattern.match(completion)),
        "format_ok_lenient": bool(LENIENT_FORMAT.fullmatch(completion.strip())),
    }


class SLOTEvaluator(LightningModule):
    """Evaluates arms of SLOT (iters 0 = the baseline) on the test questions; one shared prefill per batch.

    Args:
        backbone: the base model (alias, folder, GGUF file or hub id) and how to load it.
        checkpoint: a fine-tuned model of `cli.py fit` on `backbone` to evaluate instead, any kind
            `models/loader.py` accepts: an `epoch_N/` export, an HF `checkpoint-N/` folder (full weights or a
            PEFT adapter) or a Lightning `.ckpt`. None = `backbone` itself.
        arms: the settings compared; each writes `log_times_<iters>_lr_<lr>.jsonl`.
        generation: decoding after the optimisation (upstream's: greedy, 512 new tokens); engine hf only.
        format_pattern: a completion (as decoded) that this regex matches from its start (`re.match`, DOTALL)
            counts as well formatted (`format_accuracy`); the default is the reference's check. The stripped
            completion fully matching `R1_FORMAT_LENIENT` is reported too (`format_accuracy_lenient`).
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
        self.generation.require_hf("SLOT (model.generation)")
        if self.generation.repeats != 1:
            raise UserInputError("model.generation.repeats: SLOT arms generate one completion per question (use 1)")
        self.format_pattern = re.compile(format_pattern, re.DOTALL)
        trained = load_trained(self.backbone, checkpoint)  # here, not in configure_model: the datamodule needs
        self.model = trained.model.requires_grad_(False)  # the tokenizer and planning prefix it was trained with
        self.tokenizer, self.planning, self.trained_prompt = trained.tokenizer, trained.planning, trained.prompt
        self.checkpoint_global_step = trained.step
        self.head = OutputHead(self.model)
        self.stage_rows: list[EvaluationRow] = []
        self.evaluation_rows: list[EvaluationRow] = []

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule  # None: batches given to `trainer.test` directly
        if self.trained_prompt and datamodule is not None and asdict(datamodule.prompt) != self.trained_prompt:
            log.warning("the checkpoint was trained with prompt %s; evaluating with data.prompt %s",
                        self.trained_prompt, asdict(datamodule.prompt))  # fmt: skip

    def on_test_epoch_start(self) -> None:
        self.stage_rows = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        for part in one_question_batches(batch) if self.generation.batch_invariant else [batch]:
            self._evaluate_arms(part)

    def _evaluate_arms(self, batch: dict) -> None:
        """Every arm on one batch: one prefill, the deltas of each learning rate optimised once."""
        state = prefill(self.model, self.head, batch["prompt_ids"], batch["prompt_mask"])
        by_lr = defaultdict(list)
        for arm in self.arms:
            by_lr[arm.lr].append(arm)
        for lr, arms in by_lr.items():
            deltas, trace = optimise_deltas(self.head, state, sorted({arm.iters for arm in arms}), lr)
            for arm in arms:
                with head_input_hook(self.head, deltas[arm.iters]):
                    rows = evaluate_batch(
                        self.model,
                        self.tokenizer,
                        batch,
                        self.generation,
                        self.planning,
                        arm=arm.name,
                        past_key_values=cache_copy(state.cache),
                    )
                for i, row in enumerate(rows):
                    prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
                    row.extra.update(  # beside what the scoring put there (an lm-eval task's scores)
                        prompt=self.tokenizer.decode(prompt),
                        **format_checks(self.format_pattern, row.completions[0]),
                        slot_loss=[round(value, 6) for value in trace[i, : arm.iters + 1].tolist()],
                    )
                self.stage_rows.extend(rows)

    def on_test_epoch_end(self) -> None:
        """Gather every process's rows and log each arm's metrics computed from them."""
        self.evaluation_rows = gather_rows(self.stage_rows, [arm.name for arm in self.arms])
        for name, value in logged_metrics(self.evaluation_rows).items():
            self.log(f"test/{name}", value)
