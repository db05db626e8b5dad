"""Callbacks check what they read from the module and the datamodule at setup (`callbacks/contracts.py`): a
missing attribute is one error at the start naming the callback and the attribute; the real modules pass."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.contracts import (
    CountsGoldTypes,
    EvaluatesRows,
    HasPlanning,
    HasPrompt,
    HasValidationData,
    HoldsModel,
    ScoresLoss,
    members,
)
from callbacks.dynamics import LikelihoodDynamics
from callbacks.planning_report import PlanningReport
from callbacks.run_summary import RunSummary
from callbacks.samples import SampleWriter
from core.errors import UserInputError
from datamodules.reasoning import ReasoningDataModule
from evaluation.slot import SlotArm
from lightning_modules.finetune import CausalLMFineTuner
from lightning_modules.slot_eval import SLOTEvaluator
from models.loading import ModelSpec
from tasks.prompts import PromptSpec

ROWS = {"evaluation_rows": [], "checkpoint_global_step": 0}
DATA = {"prompt": PromptSpec(), "gold_types": {}, "val_dataloader": lambda: []}


def module_with(**attributes) -> SimpleNamespace:
    return SimpleNamespace(**attributes)


def trainer_with(datamodule) -> SimpleNamespace:
    return SimpleNamespace(datamodule=datamodule)


def test_members_are_what_each_contract_declares():
    assert members(EvaluatesRows) == ["evaluation_rows", "checkpoint_global_step"]
    assert members(ScoresLoss) == ["mean_loss"]
    assert members(HoldsModel) == ["model", "tokenizer", "backbone"]
    assert members(HasValidationData) == ["val_dataloader"]


@pytest.mark.parametrize(
    ("callback", "stage", "module", "datamodule", "message"),
    [
        (SampleWriter(), "test", {"checkpoint_global_step": 0}, DATA,
         "SampleWriter reads the model's `evaluation_rows` (EvaluatesRows), which SimpleNamespace does not have"),
        (SampleWriter(), "validate", {"evaluation_rows": []}, DATA,
         "SampleWriter reads the model's `checkpoint_global_step` (EvaluatesRows), "
         "which SimpleNamespace does not have"),
        (PlanningReport(), "test", ROWS, DATA,
         "PlanningReport reads the model's `planning` (HasPlanning), which SimpleNamespace does not have"),
        (PlanningReport(), "fit", {**ROWS, "planning": None}, {"prompt": PromptSpec()},
         "PlanningReport reads the datamodule's `gold_types` (CountsGoldTypes), which SimpleNamespace does not have"),
        (PlanningReport(), "test", {**ROWS, "planning": None}, None,
         "PlanningReport needs a datamodule (CountsGoldTypes); this run has none"),
        (RunSummary(), "fit", ROWS, DATA,
         "RunSummary reads the model's `mean_loss` (ScoresLoss), which SimpleNamespace does not have"),
        (RunSummary(), "fit", {"mean_loss": lambda batches: 0.0}, None,
         "RunSummary needs a datamodule (HasValidationData); this run has none"),
        (LikelihoodDynamics(), "fit", {"model": None, "tokenizer": None}, DATA,
         "LikelihoodDynamics reads the model's `backbone` (HoldsModel), which SimpleNamespace does not have"),
        (LikelihoodDynamics(), "fit", {"model": None, "tokenizer": None, "backbone": None}, {"gold_types": {}},
         "LikelihoodDynamics reads the datamodule's `prompt` (HasPrompt), which SimpleNamespace does not have"),
    ],
)  # fmt: skip
def test_a_missing_attribute_fails_at_setup_naming_the_callback_and_the_attribute(
    callback, stage, module, datamodule, message
):
    datamodule = None if datamodule is None else SimpleNamespace(**datamodule)
    with pytest.raises(UserInputError) as error:
        callback.setup(trainer_with(datamodule), module_with(**module), stage)
    assert str(error.value) == message


def test_callbacks_check_only_what_the_stage_reads():
    """RunSummary and LikelihoodDynamics read the module only in fit; PlanningReport skips the datamodule in
    predict; LikelihoodDynamics with its own prompt needs none from the datamodule."""
    RunSummary().setup(trainer_with(None), module_with(), "test")
    LikelihoodDynamics().setup(trainer_with(None), module_with(), "validate")
    PlanningReport().setup(trainer_with(None), module_with(**ROWS, planning=None), "predict")
    with pytest.raises(UserInputError, match="LikelihoodDynamics reads the model's `model`"):
        LikelihoodDynamics(prompt=PromptSpec()).setup(trainer_with(None), module_with(), "fit")


def test_a_trainer_stops_at_the_start_before_any_step():
    class Counting(BoringModel):
        steps = 0

        def test_step(self, batch, batch_idx):
            Counting.steps += 1
            return super().test_step(batch, batch_idx)

    trainer = L.Trainer(callbacks=[SampleWriter()], logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(UserInputError, match="^SampleWriter reads the model's `evaluation_rows` .* Counting does not"):
        trainer.test(Counting())
    assert Counting.steps == 0


def test_the_real_modules_and_datamodule_conform(tiny_llama):
    finetuner = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora")
    for contract in (EvaluatesRows, HasPlanning, ScoresLoss, HoldsModel):
        assert isinstance(finetuner, contract), contract.__name__
    slot = SLOTEvaluator(ModelSpec(name=str(tiny_llama)), arms=[SlotArm(iters=0)])
    for contract in (EvaluatesRows, HasPlanning):
        assert isinstance(slot, contract), contract.__name__
    data = ReasoningDataModule(tokenizer=finetuner.tokenizer)
    for contract in (HasPrompt, CountsGoldTypes, HasValidationData):
        assert isinstance(data, contract), contract.__name__
    for stage in ("fit", "validate", "test", "predict"):
        for callback in (SampleWriter(), PlanningReport(), RunSummary()):
            callback.setup(trainer_with(data), finetuner, stage)
        for callback in (SampleWriter(), PlanningReport()):
            callback.setup(trainer_with(data), slot, stage)
