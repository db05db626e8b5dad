"""Test-only helpers that configs can name by class_path (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import errno
import os
import signal
import time

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


class ReportSteps(L.Callback):
    """After every training batch, writes the global step to `path` and sleeps `delay` seconds, so a test can
    signal the process while it trains."""

    def __init__(self, path: str, delay: float = 0.3) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        with open(self.path, "w") as file:
            file.write(str(trainer.global_step))
        time.sleep(self.delay)


class AssertTrainMode(L.Callback):
    """Fails a training step that starts with the model (or any of its layers) in eval mode."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        assert module.model.training and all(layer.training for layer in module.model.modules())


class ReportEvaluation(L.Callback):
    """After every validation or test batch, writes "<global step> <batch index>" to `path` and sleeps `delay`
    seconds, so a test can signal the process while it evaluates."""

    def __init__(self, path: str, delay: float = 0.5) -> None:
        self.path, self.delay = path, delay

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        with open(self.path, "w") as file:
            file.write(f"{trainer.global_step} {batch_idx}")
        time.sleep(self.delay)

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_validation_batch_end(trainer, module, outputs, batch, batch_idx, dataloader_idx)


class FillDiskAtEpochEnd(L.Callback):
    """At the end of the epoch that ends at training step `step`, before that epoch's checkpoints are saved, fills
    the filesystem of `path` with the file `path` until it is full (a real ENOSPC for the writes that follow)."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.global_step != self.step:
            return
        chunk = b"\0" * (1 << 16)
        with open(self.path, "wb", buffering=0) as file:
            try:
                while file.write(chunk):
                    pass
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise


class KillDuringExport(L.Callback):
    """Kills its own process with SIGKILL (`kill -9`) in the middle of the first epoch export: after the model's
    files are in the export's staging folder, before it is renamed to `epoch_N/`."""

    def setup(self, trainer, module, stage) -> None:
        import callbacks.export as export

        original = export.export_model

        def export_then_die(*args, **kwargs) -> None:
            original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        export.export_model = export_then_die
