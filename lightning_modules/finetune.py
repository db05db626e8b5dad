"""Causal-LM fine-tuning (full, LoRA, QLoRA, prompt-tuning of planning tokens): step logic and metrics only.

The HF model is built in `configure_model` (so Lightning restores partial checkpoints into it);
checkpoints hold only the trainable weights; side effects (exports, sample tables) live in callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torchmetrics import MeanMetric
from transformers import AutoTokenizer, PreTrainedModel

from datamodules.planning import CLUSTER_METHODS, PlanningSpec
from datamodules.scoring import score_completion
from lightning_modules.errors import TrainingStopped, UserInputError
from lightning_modules.generation import GenerationSpec, generate
from lightning_modules.loading import ModelSpec, load_model, load_tokenizer
from lightning_modules.rank_log import RankLogSpec, RankRecorder
from lightning_modules.sampling_metrics import majority_vote, question_metrics
from lightning_modules.vocabulary import (
    add_tokens,
    prompt_tuning_config,
    resize_and_initialise,
    trainable_token_targets,
)

Mode = Literal["full", "lora", "qlora", "prompt-tuning", "lora+prompt-tuning", "qlora+prompt-tuning"]
TOKEN_MODES = ("prompt-tuning", "lora+prompt-tuning", "qlora+prompt-tuning")


@dataclass
class LoraSpec:
    """LoRA adapter settings (modes lora, qlora and their +prompt-tuning variants)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Module names to adapt: the MLP by default; add q_proj, k_proj, v_proj, o_proj for attention."""

    def to_config(self, trainable_token_indices: dict[str, list[int]] | None = None) -> LoraConfig:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            trainable_token_indices=trainable_token_indices,
        )


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


def build_trainable_model(
    model: PreTrainedModel, tokenizer, mode: str, lora: LoraSpec, planning: PlanningSpec, new_tokens: set[str]
) -> PreTrainedModel | PeftModel:
    """`model` with room for the planning tokens (rows of `new_tokens` initialised from their key words) and
    wrapped for `mode`: LoRA adapters and/or PEFT trainable tokens (only the planning rows train)."""
    key_tokens, words = planning.key_tokens(), {key: planning.init_word(key) for key in planning.key_tokens()}
    ids = resize_and_initialise(model, tokenizer, key_tokens, words, new_tokens)
    if mode in ("lora", "qlora"):
        return get_peft_model(model, lora.to_config())
    if mode in ("lora+prompt-tuning", "qlora+prompt-tuning"):
        return get_peft_model(model, lora.to_config(trainable_token_targets(model, ids)))
    if mode == "prompt-tuning":
        return get_peft_model(model, prompt_tuning_config(model, ids))
    return model


def rebuild_with_adapter(
    backbone: ModelSpec,
    lora: LoraSpec,
    adapter: dict,
    source: str,
    mode: str = "lora",
    planning: PlanningSpec | None = None,
) -> PeftModel:
    """The unquantised `backbone` on the CPU, wrapped for `mode` (LoRA and/or planning-token rows) and holding
    the trained `adapter` weights (keys as in the PEFT model). One path for exports and evaluation, LoRA and
    QLoRA (merging into 4-bit weights would lose precision) and FSDP-gathered weights; what does not fit is
    named in one line."""
    planning = planning or PlanningSpec()
    mode = mode.replace("qlora", "lora")
    tokenizer = load_tokenizer(backbone)
    new_tokens = set(add_tokens(tokenizer, planning.tokens()))
    base = load_model(replace(backbone, quantization=None, gradient_checkpointing=False))
    peft_model = build_trainable_model(base, tokenizer, mode, lora, planning, new_tokens)
    try:
        result = peft_model.load_state_dict(adapter, strict=False)
    except RuntimeError as error:  # shapes differ
        raise UserInputError(
            f"{source} does not match model {backbone.name}: {str(error).splitlines()[-1].strip()}"
        ) from None
    missing = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad} - set(adapter)
    if result.unexpected_keys or missing:
        example = sorted(result.unexpected_keys or missing)[0]
        raise UserInputError(
            f"{source} does not match model {backbone.name} with its {mode} settings: "
            f"{len(result.unexpected_keys)} unexpected and {len(missing)} missing adapter weights, e.g. '{example}'"
        )
    return peft_model


def load_finetuned_model(backbone: ModelSpec, checkpoint: str | None = None) -> PreTrainedModel:
    """The model to evaluate: `backbone` itself; an `epoch_N/` export (full folder, or adapter folder on
    top of `backbone`, resized to the export's tokenizer); or a Lightning checkpoint of CausalLMFineTuner on
    `backbone` (adapters and planning-token rows merged; use the run's export for the matching tokenizer)."""
    if checkpoint is None:
        return load_model(backbone)
    path = Path(checkpoint)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base = load_model(backbone)
            vocabulary = len(AutoTokenizer.from_pretrained(path))  # an adapter folder holds the run's tokenizer
            if base.get_input_embeddings().weight.shape[0] < vocabulary:  # planning tokens were added
                base.resize_token_embeddings(vocabulary, mean_resizing=False)
            return PeftModel.from_pretrained(base, path).merge_and_unload()
        return load_model(replace(backbone, name=str(path)))
    if not path.is_file():
        raise UserInputError(f"checkpoint '{path}' does not exist")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    hparams = saved.get("hyper_parameters", {})
    weights = {key.removeprefix("model."): value for key, value in saved["state_dict"].items()}
    planning = PlanningSpec(**hparams.get("planning") or {})
    if hparams.get("mode") != "full":
        lora = LoraSpec(**hparams.get("lora", {}))
        peft_model = rebuild_with_adapter(backbone, lora, weights, f"checkpoint '{path}'", hparams["mode"], planning)
        return peft_model.merge_and_unload()
    model = load_model(backbone)
    tokenizer = load_tokenizer(backbone)
    new_tokens = set(add_tokens(tokenizer, planning.tokens()))
    build_trainable_model(model, tokenizer, "full", LoraSpec(), planning, new_tokens)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise UserInputError(f"checkpoint '{path}' does not match model {backbone.name}: {error}") from None
    return model
