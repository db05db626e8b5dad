"""LightningCLI's private steps behind commands/cli_internals.py, checked on a real LightningCLI: Lightning still
calls each of them, in the order the CLI's rules need, and the hooks still reach Lightning's own steps. A Lightning
or jsonargparse upgrade that renames, reorders or stops calling one fails here."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from commands.cli_internals import HookedLightningCLI, option_names


class ScaledModel(BoringModel):
    """BoringModel with a saved hyper-parameter."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()


class RecordingCLI(HookedLightningCLI):
    """Records the hooks in the order LightningCLI runs them; each then runs Lightning's own step."""

    def apply_checkpoint_settings(self) -> None:
        self.calls = ["apply_checkpoint_settings"]
        super().apply_checkpoint_settings()

    def seed(self) -> None:
        self.calls.append("seed")
        super().seed()

    def before_instantiate_classes(self) -> None:
        self.calls.append("before_instantiate_classes")

    def run_subcommand(self, subcommand: str) -> None:
        self.calls.append(f"run_subcommand {subcommand}")
        super().run_subcommand(subcommand)


class ParseOnlyCLI(RecordingCLI):
    """Parses and instantiates, runs nothing."""

    def run_subcommand(self, subcommand: str) -> None:
        pass


def quiet_trainer(root: Path) -> list[str]:
    """A CPU trainer in `root` that writes and prints nothing."""
    quiet = ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary")
    return [f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", *(f"--trainer.{k}=false" for k in quiet)]


def test_lightning_runs_the_hooks_in_order_and_each_reaches_lightnings_step(tmp_path):
    args = ["fit", *quiet_trainer(tmp_path), "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    cli = RecordingCLI(ScaledModel, BoringDataModule, args=[*args, "--seed_everything=true"])
    assert cli.calls == ["apply_checkpoint_settings", "seed", "before_instantiate_classes", "run_subcommand fit"]
    assert isinstance(cli.config.fit.seed_everything, int)  # Lightning's seeding chose and recorded a seed
    assert cli.trainer.global_step == 2  # Lightning's fit ran


def test_the_checkpoint_hook_reapplies_a_checkpoints_hyper_parameters(tmp_path):
    checkpoint = tmp_path / "scaled.ckpt"
    torch.save({"hyper_parameters": {"scale": 3.0}}, checkpoint)

    cli = ParseOnlyCLI(
        ScaledModel, BoringDataModule, args=["validate", *quiet_trainer(tmp_path), f"--ckpt_path={checkpoint}"]
    )
    assert cli.config.validate.model.scale == 3.0
    assert cli.model.hparams.scale == 3.0


def test_option_names_are_the_dotted_options_of_the_subcommand_given(tmp_path):
    cli = ParseOnlyCLI(ScaledModel, BoringDataModule, args=["fit", *quiet_trainer(tmp_path)])
    names = option_names(cli.parser, ["fit", "--trainer.max_steps", "3"])
    expected = {"config", "model.scale", "trainer.max_steps", "trainer.logger", "ckpt_path", "seed_everything"}
    assert expected <= set(names) and "help" not in names and "subcommand" not in names
    top_level = option_names(cli.parser, [])
    assert {"config", "subcommand"} <= set(top_level) and "help" not in top_level
    assert "trainer.max_steps" not in top_level
