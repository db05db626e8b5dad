"""Export callback: after every epoch, `epoch_{N}/` as a HF folder any evaluator loads unchanged."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.checkpoints import epoch_finished
from core.errors import NotSaved, UserInputError
from core.io import atomic_directory, remove_partial
from core.run_directory import run_directory
from models.checkpoint_extras import module_weights
from models.fingerprint import recorded_fingerprint
from models.modes import TrainingMode
from models.trained_weights import trained_model
from models.training_info import TrainingInfo, read_training_info

log = logging.getLogger(__name__)


class EpochExport(L.Callback):
    """Writes `{run dir}/epoch_{N}/` (0-indexed) after each complete training epoch, safetensors only.

    The export of epoch N is written after epoch N's checkpoints (at the start of epoch N+1, or at the end of
    training), so a process killed while exporting leaves a checkpoint that holds epoch N, and the export still
    to write: the resumed run writes it first. An epoch that training left early (`max_steps`, a signal) is not
    exported as `epoch_N/`: the run that resumes it exports it once it is complete. The hidden staging folders
    (`.epoch_N-partial-*`) that a killed export left are removed at the next start.

    Args:
        enabled: write exports at all.
        adapter_only: write only the PEFT adapter (loadable by `PeftModel.from_pretrained`) instead
            of the merged full model (loadable by `AutoModelForCausalLM.from_pretrained`, inspect-ai's
            `hf/local` and lm-eval's `hf`). Ignored for full fine-tuning.
        dirpath: where the epoch folders go; None = the run's log directory.
    """

    def __init__(self, enabled: bool = True, adapter_only: bool = False, dirpath: str | None = None) -> None:
        self.enabled, self.adapter_only, self.dirpath = enabled, adapter_only, dirpath
        self.pending: dict | None = None
        """The finished epoch still to export, {"epoch": N, "global_step": S}; saved in checkpoints."""

    def state_dict(self) -> dict:
        return {"pending": dict(self.pending)} if self.pending else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.pending = state_dict.get("pending")

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_directory(trainer)  # a broadcast under DDP: every rank

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        folder = self._folder(trainer)
        removed = remove_partial(folder, "epoch_*") if trainer.is_global_zero else []
        if removed:
            log.warning("removed %d partial epoch export(s) an interrupted run left: %s", len(removed), removed[0])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if not epoch_finished(trainer):
            rank_zero_info(
                f"Epoch {trainer.current_epoch} stopped at step {trainer.global_step}, before its end: not exported "
                "(resumed with --ckpt_path last, it is exported once complete)"
            )
            return
        # Lightning saves the epoch's checkpoints after this hook: the export follows at the loop's next hook.
        self.pending = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export_pending(trainer, module)  # resumed from a checkpoint saved before its epoch's export

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export_pending(trainer, module)  # likewise, for strategies that restore after on_fit_start

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export_pending(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export_pending(trainer, module)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # A resumed run with nothing left to train, whose strategy restored after on_fit_start; after the
        # teardown only unsharded weights can still be gathered.
        if self.pending and module.device_mesh is None:
            self._export_pending(trainer, module)
        elif self.pending:
            log.warning(
                "epoch %d was not exported (a sharded run resumed with nothing left to train); its weights are in %s, "
                "and a resume with a larger --trainer.max_epochs exports it first",
                self.pending["epoch"],
                trainer.ckpt_path,
            )

    def _export_pending(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled or not self.pending:
            return
        epoch, step = self.pending["epoch"], self.pending["global_step"]
        folder = self._folder(trainer)
        path = folder / f"epoch_{epoch}"
        done = trainer.strategy.broadcast(trainer.is_global_zero and exported_at(path) == step)
        if not done:
            state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP: every rank calls
            if trainer.is_global_zero:
                self._write(trainer, module, state, path, epoch, step)
                rank_zero_info(f"Exported {path}")
        self.pending = None

    def _write(self, trainer: L.Trainer, module: L.LightningModule, state: dict, path: Path, epoch: int, step: int):
        # Rebuilding the adapter draws random init weights: keep training's random stream untouched.
        try:
            with torch.random.fork_rng(devices=[]), atomic_directory(path) as staging:
                dtype = TRUE_PRECISION.get(str(trainer.precision))
                export_model(module, state, staging, adapter_only=self.adapter_only, dtype=dtype)
                datamodule = trainer.datamodule
                has_prompt = datamodule is not None and hasattr(datamodule, "prompt")
                TrainingInfo(
                    global_step=step,
                    epoch=epoch,
                    mode=str(module.mode),
                    backbone=asdict(module.backbone),
                    planning={**asdict(module.planning), "tokens": module.planning.key_tokens()},
                    prompt=asdict(datamodule.prompt) if has_prompt else None,
                    task=datamodule.task.name if has_prompt else None,
                    base_fingerprint=recorded_fingerprint(module.model),
                ).write(staging)
        except OSError as error:
            raise NotSaved(
                f"could not write the epoch export '{path}': {error.strerror or error}; no partial folder was left: "
                "make room, then resume with --ckpt_path last, which writes it"
            ) from error


def exported_at(path: Path) -> int | None:
    """The global step of the complete export at `path` (None when there is none)."""
    try:
        info = read_training_info(path)
    except UserInputError:
        return None
    return info.global_step if info is not None else None


TRUE_PRECISION = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
"""Precisions that train every weight in a lower dtype: the merged export is saved in it (the model trained)."""


def export_model(
    module: L.LightningModule, state: dict, path: Path, adapter_only: bool = False, dtype: torch.dtype | None = None
) -> None:
    """Save the fine-tuned model of `module` (weights in `state`) as a HF folder with its tokenizer; a merged
    adapter export in `dtype` when given (full fine-tuning saves its weights as they are)."""
    mode = TrainingMode(module.mode)
    keep = module.trainable_parameter_names() if mode.saves_trainable_only else set(state)
    weights = module_weights({key: value.detach().cpu() for key, value in state.items() if key in keep})
    if not mode.saves_trainable_only:
        module.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
        module.tokenizer.save_pretrained(path)
        return
    model = trained_model(
        module.backbone,
        module.mode,
        module.lora,
        module.planning,
        weights,
        "export",
        recorded_fingerprint(module.model),
        merge=not adapter_only,
    )
    if adapter_only:
        model.save_pretrained(path, safe_serialization=True)
    else:
        model.to(dtype or model.dtype).save_pretrained(path, safe_serialization=True)
    module.tokenizer.save_pretrained(path)
