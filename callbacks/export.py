"""Export callback: after every epoch, `epoch_{N}/` as a HF folder any evaluator loads unchanged."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from core.io import atomic_directory, run_directory, write_json_atomic
from models.adapters import rebuild_with_adapter
from models.loader import model_from_training_state


class EpochExport(L.Callback):
    """Writes `{run dir}/epoch_{N}/` (0-indexed) after each training epoch, safetensors only.

    Args:
        enabled: write exports at all.
        adapter_only: write only the PEFT adapter (loadable by `PeftModel.from_pretrained`) instead
            of the merged full model (loadable by `AutoModelForCausalLM.from_pretrained`, inspect-ai's
            `hf/local` and lm-eval's `hf`). Ignored for full fine-tuning.
        dirpath: where the epoch folders go; None = the run's log directory.
    """

    def __init__(self, enabled: bool = True, adapter_only: bool = False, dirpath: str | None = None) -> None:
        self.enabled, self.adapter_only, self.dirpath = enabled, adapter_only, dirpath

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP: every rank calls
        export_dir = Path(self.dirpath) if self.dirpath else run_directory(trainer)  # likewise
        if not trainer.is_global_zero:
            return
        path = export_dir / f"epoch_{trainer.current_epoch}"
        # Rebuilding the adapter draws random init weights: keep training's random stream untouched.
        with torch.random.fork_rng(devices=[]), atomic_directory(path) as staging:
            export_model(module, state, staging, adapter_only=self.adapter_only)
            info = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "mode": module.mode}
            info["backbone"] = asdict(module.backbone)
            info["planning"] = {**asdict(module.planning), "tokens": module.planning.key_tokens()}
            datamodule = trainer.datamodule
            if datamodule is not None and hasattr(datamodule, "prompt"):
                info["prompt"] = asdict(datamodule.prompt)
                info["task"] = datamodule.task.name
            write_json_atomic(staging / "training_info.json", info)
        rank_zero_info(f"Exported {path}")


def export_model(module: L.LightningModule, state: dict, path: Path, adapter_only: bool = False) -> None:
    """Save the fine-tuned model of `module` (weights in `state`) as a HF folder with its tokenizer."""
    weights = {key.removeprefix("model."): value.detach().cpu() for key, value in state.items()}
    if module.mode == "full":
        module.model.save_pretrained(path, state_dict=weights, safe_serialization=True)
        module.tokenizer.save_pretrained(path)
        return
    trainable = {name.removeprefix("model.") for name in module.trainable_parameter_names()}
    adapter = {key: value for key, value in weights.items() if key in trainable}
    if adapter_only:
        peft_model = rebuild_with_adapter(module.backbone, module.lora, adapter, "export", module.mode, module.planning)
        peft_model.save_pretrained(path, safe_serialization=True)
    else:
        merged = model_from_training_state(
            module.backbone, module.mode, module.lora, module.planning, adapter, "export"
        )
        merged.save_pretrained(path, safe_serialization=True)
    module.tokenizer.save_pretrained(path)
