"""Causal-LM fine-tuning (full, LoRA, QLoRA, prompt-tuning of planning tokens): step logic and metrics only.

The tokenizer and the model come from `models/` (`planning_tokenizer`; `build_training_model`, called in
`configure_model` so Lightning restores partial checkpoints into it); the blow-up checks are `models/blow_up.py`,
scoring without disturbing training `evaluation/undisturbed.py`, the RNG states a checkpoint keeps `core/rng.py`.
Checkpoints hold only the trainable weights; side effects (exports, sample tables) live in callbacks, which read
the attributes `callbacks/contracts.py` lists.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from core.errors import UserInputError
from core.rng import restore_rng_states, rng_states
from evaluation.generation import GenerationSpec
from evaluation.pipeline import evaluate_batch
from evaluation.rank_log import RankLogSpec
from evaluation.rows import EvaluationRow, gather_rows, logged_metrics
from evaluation.teacher_forcing import losses_from_logits, response_loss, response_losses
from evaluation.undisturbed import undisturbed
from lightning_modules.schedules import refit_total_steps
from models.adapters import LoraSpec, planning_tokenizer
from models.blow_up import blew_up, blown_up_step, non_finite_loss, trainable_norm
from models.checkpoint_extras import CheckpointExtras, read_extras, write_extras
from models.fingerprint import recorded_fingerprint, refuse_other_base
from models.loading import ModelSpec
from models.modes import Mode, TrainingMode
from models.trained_weights import refuse_mismatch
from models.training_model import Loss, build_training_model
from tasks.planning import CLUSTER_METHODS, PlanningSpec

log = logging.getLogger(__name__)


class CausalLMFineTuner(LightningModule):
    """Fine-tunes a causal LM on prompt -> response data; validates with loss and answer accuracy.

    Args:
        backbone: the model to fine-tune (alias, folder, GGUF file or hub id) and how to load it.
        mode: full (every weight), lora (adapters on a frozen model), qlora (adapters on a 4/8-bit model),
            prompt-tuning (only the planning tokens' embedding and lm_head rows), lora+prompt-tuning (both),
            qlora+prompt-tuning (both, on a 4/8-bit model).
        lora: adapter settings of the lora / qlora modes.
        loss: how the training loss (mean cross-entropy over the response tokens) is computed:
            chunked (the output head only at the response positions, fp32, in chunks: no [batch, length, vocab]
            logits), hf (the model's own `labels=` loss over full logits), liger (Liger's fused linear
            cross-entropy plus its RMSNorm / SwiGLU kernels; needs CUDA and the liger-kernel package).
        planning: planning tokens (step-type selection, n_prefix, n_special); added to the tokenizer here,
            the datamodule writes them into the targets (linked by `cli.py`).
        generation: decoding used for validation / test accuracy and predictions.
            Repeats > 1: n samples per question, majority-vote accuracy, maj@k and pass@k.
            engine vllm: test / predict only (fit's in-loop validation needs engine hf).
        rank_log: also log the rank of each chosen token at low-confidence steps (samples/*_ranks.jsonl).
        optimizer: optimizer callable over the trainable parameters (default AdamW, lr 2e-4).
        scheduler: learning-rate scheduler callable, stepped every optimizer step.
    """

    def __init__(
        self,
        backbone: ModelSpec | None = None,
        mode: Mode = "lora",
        lora: LoraSpec | None = None,
        loss: Loss = "chunked",
        planning: PlanningSpec | None = None,
        generation: GenerationSpec | None = None,
        rank_log: RankLogSpec | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # evaluation knobs and the loss kernel (a compute choice: a liger-trained checkpoint evaluates on a CPU) are
        # kept out of the hparams that `--ckpt_path` re-applies over the config
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "generation", "rank_log", "loss"])
        backbone, training_mode = backbone or ModelSpec(), TrainingMode(mode)
        if training_mode.quantized and backbone.quantization is None:
            backbone = replace(backbone, quantization="nf4")
        if not training_mode.quantized and backbone.quantization is not None:
            raise UserInputError(
                f"model.backbone.quantization={backbone.quantization} needs mode: qlora or qlora+prompt-tuning"
            )
        self.backbone, self.mode, self.loss = backbone, training_mode, loss
        self.lora = lora or LoraSpec()
        self.generation = generation or GenerationSpec()
        self.rank_log = rank_log
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.planning = planning or PlanningSpec()
        if self.planning.embedding_model is None and self.planning.method in CLUSTER_METHODS:
            self.planning = replace(self.planning, embedding_model=self.backbone.name)
        if training_mode.trains_token_rows and not self.planning.active:
            raise UserInputError(f"model.mode={mode} trains planning tokens: set model.planning.method")
        if training_mode.lora_only and self.planning.active:
            raise UserInputError(f"model.mode={mode} leaves the planning tokens untrained: use {mode}+prompt-tuning")
        self.tokenizer, new_tokens = planning_tokenizer(self.backbone, self.planning)
        self.new_tokens = set(new_tokens)  # rows initialised in configure_model
        self.model = None
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.stage_rows: list[EvaluationRow] = []
        self.evaluation_rows: list[EvaluationRow] = []
        """The gathered rows of the last validation / test / predict epoch (what the sample files hold)."""
        self.checkpoint_global_step = 0
        self.estimated_total_steps: int | None = None
        """The scheduler's length when this run estimated it (its `total_steps` left None): the run's length."""

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.generation.require_hf("fit's in-loop validation (model.generation)")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        mesh = self.device_mesh  # FSDP2 (configs/presets/gpu_fsdp.yaml): sharded, only rank 0 reads the weights
        self.model = build_training_model(
            self.backbone,
            self.mode,
            self.lora,
            self.planning,
            self.loss,
            self.tokenizer,
            self.new_tokens,
            mesh=None if mesh is None else mesh["data_parallel"],
            device=self.trainer.strategy.root_device if self._trainer is not None else self.device,
        )

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        if self.planning.token_lr is not None and self.mode.trains_token_rows:  # the planning rows: their own rate
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
            scheduler.total_steps = self.estimated_total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run that trains to another step than the one that saved the checkpoint (a larger
        `max_steps`): the estimated schedule takes this run's length (the checkpoint restored the old one)."""
        configs = self.trainer.lr_scheduler_configs
        if self.estimated_total_steps is None or not configs or not hasattr(configs[0].scheduler, "total_steps"):
            return
        old = refit_total_steps(configs[0].scheduler, self.estimated_total_steps)
        if old is not None and self.trainer.is_global_zero:
            log.warning(
                "the learning-rate schedule restored from the checkpoint ends at step %d; this run trains to step %d, "
                "so the schedule now ends there (from step %d on)",
                old,
                self.estimated_total_steps,
                self.global_step,
            )

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token loss over the response tokens, and how many tokens it averages. Packed batches carry
        `position_ids` (one segment per example), which replace the 2D mask."""
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "position_ids") if key in batch}
        tokens = (batch["labels"][:, 1:] != -100).sum()
        if self.loss == "hf" or self.device_mesh is not None:  # FSDP2 unshards its root weights in forward only
            if "position_ids" in inputs:  # with no 2D mask and no cache, the model reads the packing from them
                inputs["attention_mask"] = None
            return self.model(**inputs, use_cache=False).loss, tokens
        return response_loss(self.model, **inputs, fused=self.loss == "liger"), tokens

    def mean_loss(self, batches) -> float:
        """Token-weighted mean response loss over `batches` (on this module's device), without disturbing training
        (`evaluation.undisturbed`: dropout off, RNG restored): the quantity `val/loss` reports, without generating."""
        total, count = 0.0, 0
        with undisturbed(self.model):
            for batch in batches:
                loss, tokens = self._loss(self.trainer.strategy.batch_to_device(batch))
                total, count = total + loss.item() * tokens.item(), count + tokens.item()
        return total / max(count, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The training loss; a non-finite one stops training (models/blow_up.py) before anything saves it."""
        loss, tokens = self._loss(batch)
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            raise non_finite_loss(loss.item(), self.global_step, self._checkpoint_folders())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", tokens.float(), reduce_fx="sum")
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, checked here, before any callback can save its weights: weights that it made
        non-finite or blew up (models/blow_up.py) stop training."""
        before = trainable_norm(self)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        after = trainable_norm(self)
        if self.trainer.strategy.reduce_boolean_decision(blew_up(before, after), all=False):
            rates = [group["lr"] for group in optimizer.param_groups]
            raise blown_up_step(self.global_step, before, after, rates, self._checkpoint_folders())

    def _checkpoint_folders(self) -> list[Path]:
        return [Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]

    def on_validation_epoch_start(self) -> None:
        self.stage_rows = []

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        self.stage_rows.extend(self._generate(batch))

    def _evaluate(self, batch: dict) -> None:
        """Rows of the batch's questions, each with the teacher-forced loss of its gold response."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.device_mesh is not None:  # FSDP2: through the model's forward, which gathers its root weights
            loss_sums, tokens = losses_from_logits(self.model(input_ids=ids, attention_mask=mask).logits, labels)
        else:
            loss_sums, tokens = response_losses(self.model, ids, mask, labels)
        rows = self._generate(batch)
        for row, loss_sum, count in zip(rows, loss_sums.tolist(), tokens.tolist(), strict=True):
            row.loss_sum, row.loss_tokens = loss_sum, count
        self.stage_rows.extend(rows)

    def _generate(self, batch: dict) -> list[EvaluationRow]:
        return evaluate_batch(self.model, self.tokenizer, batch, self.generation, self.planning, self.rank_log)

    def on_validation_epoch_end(self) -> None:
        self._log_rows("val")

    def on_test_epoch_end(self) -> None:
        self._log_rows("test")

    def on_predict_epoch_end(self) -> None:
        self.evaluation_rows = gather_rows(self.stage_rows)

    def _log_rows(self, stage: str) -> None:
        """Gather every process's rows (padding repeats dropped) and log the metrics computed from them."""
        self.evaluation_rows = gather_rows(self.stage_rows)
        for name, value in logged_metrics(self.evaluation_rows).items() if self.evaluation_rows else ():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("loss", "accuracy"))

    def trainable_parameter_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extras = CheckpointExtras(self.planning.key_tokens(), rng_states(), recorded_fingerprint(self.model))
        write_extras(checkpoint, extras, self.trainable_parameter_names() if self.mode.saves_trainable_only else None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_global_step = checkpoint.get("global_step", 0)  # names the outputs of `test`
        extras = read_extras(checkpoint, "the checkpoint")
        saved_tokens, tokens = extras.planning_tokens or {}, self.planning.key_tokens()
        if saved_tokens != tokens:
            differ = sorted(set(map(str, saved_tokens.items())) ^ set(map(str, tokens.items())))
            raise UserInputError(
                f"the checkpoint's planning tokens differ from model.planning's: keys {sorted(saved_tokens)} "
                f"vs {sorted(tokens)} (first difference: {differ[0]})"
            )
        refuse_other_base(
            extras.base_fingerprint, recorded_fingerprint(self.model), self.backbone.name, "the checkpoint"
        )
        restore_rng_states(extras.rng_states)  # dropout continues exactly on resume
        saved = set(checkpoint["state_dict"])
        missing, unexpected = self.trainable_parameter_names() - saved, saved - set(self.state_dict())
        refuse_mismatch(missing, unexpected, "the checkpoint", self.backbone.name, self.mode)
