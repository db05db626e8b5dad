"""Test-only helpers that configs can name by class_path (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import lightning as L
import torch


class PoisonWeightsAtStep(L.Callback):
    """Sets one trainable weight to NaN before training step `step`, so its loss is non-finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            parameter = next(p for p in module.parameters() if p.requires_grad)
            with torch.no_grad():
                parameter.fill_(float("nan"))


class CrashAtStep(L.Callback):
    """Raises before training step `step`: a simulated crash (pre-emption, OOM, node failure)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class AssertTrainMode(L.Callback):
    """Fails a training step that starts with the model (or any of its layers) in eval mode."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        assert module.model.training and all(layer.training for layer in module.model.modules())
