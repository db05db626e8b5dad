"""Causal-LM fine-tuning (full, LoRA, QLoRA, prompt-tuning of planning tokens): step logic and metrics only.

The HF model is built in `configure_model` (so Lightning restores partial checkpoints into it);
checkpoints hold only the trainable weights; side effects (exports, sample tables) live in callbacks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from core.errors import TrainingStopped, UserInputError
from evaluation.generation import GenerationSpec, generate
from evaluation.rank_log import RankLogSpec, RankRecorder
from evaluation.sampling_metrics import majority_vote, question_metrics
from models.adapters import LoraSpec, build_trainable_model
from models.loading import ModelSpec, load_model, load_tokenizer
from models.vocabulary import (
    add_tokens,
)
from tasks.planning import CLUSTER_METHODS, PlanningSpec
from tasks.scoring import score_completion

Mode = Literal["full", "lora", "qlora", "prompt-tuning", "lora+prompt-tuning", "qlora+prompt-tuning"]
TOKEN_MODES = ("prompt-tuning", "lora+prompt-tuning", "qlora+prompt-tuning")


class CausalLMFineTuner(LightningModule):
    """Fine-tunes a causal LM on prompt -> response data; validates with loss and answer accuracy.

    Args:
        backbone: the model to fine-tune (alias, folder, GGUF file or hub id) and how to load it.
        mode: full (every weight), lora (adapters on a frozen model), qlora (adapters on a 4/8-bit model),
            prompt-tuning (only the planning tokens' embedding and lm_head rows), lora+prompt-tuning (both),
            qlora+prompt-tuning (both, on a 4/8-bit model).
        lora: adapter settings of the lora / qlora modes.
        planning: planning tokens (step-type selection, n_prefix, n_special); added to the tokenizer here,
            the datamodule writes them into the targets (linked by `cli.py`).
        generation: decoding used for validation / test accuracy and predictions.
            Repeats > 1: n samples per question, majority-vote accuracy, maj@k and pass@k.
        rank_log: also log the rank of each chosen token at low-confidence steps (samples/*_ranks.jsonl).
        optimizer: optimizer callable over the trainable parameters (default AdamW, lr 2e-4).
        scheduler: learning-rate scheduler callable, stepped every optimizer step.
    """

    def __init__(
        self,
        backbone: ModelSpec | None = None,
        mode: Mode = "lora",
        lora: LoraSpec | None = None,
        planning: PlanningSpec | None = None,
        generation: GenerationSpec | None = None,
        rank_log: RankLogSpec | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # evaluation knobs are kept out of the hparams that `--ckpt_path` re-applies over the config
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "generation", "rank_log"])
        backbone = backbone or ModelSpec()
        if mode.startswith("qlora") and backbone.quantization is None:
            backbone = replace(backbone, quantization="nf4")
        if not mode.startswith("qlora") and backbone.quantization is not None:
            raise UserInputError(
                f"model.backbone.quantization={backbone.quantization} needs mode: qlora or qlora+prompt-tuning"
            )
        self.backbone, self.mode = backbone, mode
        self.lora = lora or LoraSpec()
        self.generation = generation or GenerationSpec()
        self.rank_log = rank_log
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.planning = planning or PlanningSpec()
        if self.planning.embedding_model is None and self.planning.method in CLUSTER_METHODS:
            self.planning = replace(self.planning, embedding_model=self.backbone.name)
        if mode in TOKEN_MODES and not self.planning.active:
            raise UserInputError(f"model.mode={mode} trains planning tokens: set model.planning.method")
        if mode in ("lora", "qlora") and self.planning.active:
            raise UserInputError(f"model.mode={mode} leaves the planning tokens untrained: use {mode}+prompt-tuning")
        self.tokenizer = load_tokenizer(self.backbone)
        self.new_tokens = set(add_tokens(self.tokenizer, self.planning.tokens()))  # rows initialised in configure_model
        self.model = None
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()
        self.test_loss, self.test_accuracy = MeanMetric(), MeanMetric()
        ks = [k for k in sorted(set(self.generation.at_k)) if k <= self.generation.repeats]
        self.at_k_metrics = (
            nn.ModuleDict({f"{s}_{m}_{k}": MeanMetric() for s in ("val", "test") for m in ("maj", "pass") for k in ks})
            if self.generation.repeats > 1
            else None
        )
        self.checkpoint_global_step = 0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = build_trainable_model(
            load_model(self.backbone), self.tokenizer, self.mode, self.lora, self.planning, self.new_tokens
        )
        self.model = model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        if self.planning.token_lr is not None and self.mode in TOKEN_MODES:  # the planning rows: their own rate
            rows = [p for n, p in self.named_parameters() if p.requires_grad and "trainable_tokens_delta" in n]
            rest = [p for p in parameters if all(p is not row for row in rows)]
            groups = ({"params": rest}, {"params": rows, "lr": self.planning.token_lr})
            parameters = [group for group in groups if group["params"]]
        optimizer = (
            self.optimizer_factory(parameters)
            if self.optimizer_factory
            else torch.optim.AdamW(parameters, lr=2e-4, weight_decay=0.0)
        )
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token loss over the response tokens, and how many tokens it averages."""
        output = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return output.loss, (batch["labels"][:, 1:] != -100).sum()

    @torch.no_grad()
    def mean_loss(self, batches) -> float:
        """Token-weighted mean response loss over `batches` (on this module's device), in eval mode: the
        quantity `val/loss` reports, without generating. The global RNG is left as it was (a DataLoader draws
        its base seed from it), so a resumed run stays bit-exact."""
        was_training, total, count = self.model.training, 0.0, 0
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                for batch in batches:
                    loss, tokens = self._loss(self.trainer.strategy.batch_to_device(batch))
                    total, count = total + loss.item() * tokens.item(), count + tokens.item()
        finally:
            self.model.train(was_training)
        return total / max(count, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, tokens = self._loss(batch)
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            raise TrainingStopped(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}: training stopped "
                "before the optimizer step; the last saved checkpoint is the last good one"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", tokens.float(), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.val_loss, self.val_accuracy, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.test_loss, self.test_accuracy, "test")

    def _evaluate(self, batch: dict, loss_metric: MeanMetric, accuracy: MeanMetric, stage: str) -> dict:
        loss, tokens = self._loss(batch)
        loss_metric.update(loss, weight=tokens)
        rows = self.predict_step(batch, 0)["rows"]
        accuracy.update(torch.tensor([float(row["correct"]) for row in rows], device=self.device))
        size = len(rows)
        self.log(f"{stage}/loss", loss_metric, batch_size=size, prog_bar=True)
        self.log(f"{stage}/accuracy", accuracy, batch_size=size, prog_bar=True)
        for name in rows[0].get("metrics", {}) if self.at_k_metrics is not None else ():
            metric = self.at_k_metrics[f"{stage}_{name.replace('@', '_')}"]
            metric.update(torch.tensor([row["metrics"][name] for row in rows], device=self.device))
            self.log(f"{stage}/{name}", metric, batch_size=size)
        return {"rows": rows}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One row per question. repeats = 1: its completion, prediction and correctness. repeats = n > 1: the n
        completions, predictions and correctness flags, the majority answer as prediction / correct, and its
        maj@k / pass@k. With `rank_log`, each row's "ranks" hold one entry per sample (the SampleWriter moves
        them to their own file)."""
        recorder = RankRecorder(self.rank_log) if self.rank_log is not None else None
        completions = generate(
            self.model,
            self.tokenizer,
            batch["prompt_ids"],
            batch["prompt_mask"],
            self.generation,
            rank_recorder=recorder,
        )
        n, rows = self.generation.repeats, []
        for index in range(len(batch["id"])):
            samples = completions[index * n : (index + 1) * n]
            scored = [
                score_completion(batch["answer_format"], self.planning.remove_tokens(text), batch["answer"][index])
                for text in samples
            ]
            predictions, correct = [p for p, _ in scored], [c for _, c in scored]
            row = {"id": batch["id"][index], "question": batch["question"][index]}
            if n == 1:
                row.update(completion=samples[0], prediction=predictions[0])
            else:
                row.update(completions=samples, predictions=predictions, samples_correct=correct)
                row["prediction"], majority_correct = majority_vote(predictions, correct)
            row.update(answer=batch["answer"][index], correct=correct[0] if n == 1 else majority_correct)
            if n > 1:
                row["metrics"] = question_metrics(predictions, correct, self.generation.at_k)
            if recorder is not None:
                row["ranks"] = [
                    {
                        "low_confidence_ranks": recorder.low_confidence[i],
                        "low_probability_ranks": recorder.low_probability[i],
                    }
                    for i in range(index * n, (index + 1) * n)
                ]
            rows.append(row)
        return {"rows": rows}

    def trainable_parameter_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["planning_tokens"] = self.planning.key_tokens()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}  # dropout continues exactly on resume
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.mode != "full":
            keep = self.trainable_parameter_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_global_step = checkpoint.get("global_step", 0)  # names the outputs of `test`
        saved_tokens, tokens = checkpoint.get("planning_tokens", {}), self.planning.key_tokens()
        if saved_tokens != tokens:
            differ = sorted(set(map(str, saved_tokens.items())) ^ set(map(str, tokens.items())))
            raise UserInputError(
                f"the checkpoint's planning tokens differ from model.planning's: keys {sorted(saved_tokens)} "
                f"vs {sorted(tokens)} (first difference: {differ[0]})"
            )
        rng_states = checkpoint.get("rng_states", {})
        if "torch" in rng_states:
            torch.set_rng_state(rng_states["torch"])
        if "cuda" in rng_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_states["cuda"])
        saved = set(checkpoint["state_dict"])
        unexpected = saved - set(self.state_dict())
        missing = self.trainable_parameter_names() - saved
        if unexpected or missing:
            example = sorted(unexpected or missing)[0]
            raise UserInputError(
                f"the checkpoint does not match this model (backbone {self.backbone.name}, mode {self.mode}): "
                f"{len(unexpected)} unexpected and {len(missing)} missing weights, e.g. '{example}'"
            )
