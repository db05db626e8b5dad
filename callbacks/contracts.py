"""What each callback reads from the LightningModule and the datamodule, as runtime-checkable protocols.

The LightningModules and the datamodule conform structurally (they import nothing from `callbacks/`); each
callback checks what it reads in its `setup` with `require`, so a missing attribute is one error at the start of
the run, naming the callback and the attribute, instead of an output silently left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from torch import nn
from transformers import PreTrainedTokenizerBase

from core.errors import UserInputError
from evaluation.rows import EvaluationRow
from models.loading import ModelSpec
from tasks.planning import PlanningSpec
from tasks.prompts import PromptSpec


@runtime_checkable
class EvaluatesRows(Protocol):
    """A module whose evaluation epochs end with their gathered rows (what `SampleWriter` writes)."""

    evaluation_rows: list[EvaluationRow]
    """The gathered rows of the last validation / test / predict epoch, the same on every process."""
    checkpoint_global_step: int
    """The step of the checkpoint the module was loaded from (0 when none): names the outputs of `test`."""


@runtime_checkable
class HasPlanning(Protocol):
    """A module whose rows `PlanningReport` counts planning tokens in."""

    planning: PlanningSpec | None
    """The planning tokens of the model (None or inactive: no report)."""


@runtime_checkable
class ScoresLoss(Protocol):
    """A module `RunSummary` asks for the validation loss before training starts."""

    def mean_loss(self, batches: Iterable[dict]) -> float:
        """Token-weighted mean response loss over `batches`, without disturbing training."""


@runtime_checkable
class HoldsModel(Protocol):
    """A module whose HF model `LikelihoodDynamics` scores live."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    backbone: ModelSpec


@runtime_checkable
class HasValidationData(Protocol):
    """A datamodule with validation batches (the loss before training)."""

    def val_dataloader(self) -> Iterable[dict]:
        """The validation batches."""


@runtime_checkable
class HasPrompt(Protocol):
    """A datamodule that formats prompts with a `PromptSpec` (the format training uses)."""

    prompt: PromptSpec


@runtime_checkable
class CountsGoldTypes(Protocol):
    """A datamodule that counts the planning types of each split's gold solutions."""

    gold_types: dict[str, dict[str, dict[str, int]]]
    """{split: {example id: {planning key: count}}}."""


def members(contract: type) -> list[str]:
    """The attributes and methods `contract` declares, in declaration order."""
    methods = [name for name, value in vars(contract).items() if callable(value) and not name.startswith("_")]
    return [*getattr(contract, "__annotations__", {}), *methods]


def require(callback: object, role: str, value: object, contract: type) -> None:
    """Raise a one-line UserInputError unless `value` (the trainer's `role`: "model" or "datamodule") has every
    attribute of `contract` that `callback` reads."""
    if value is None:
        raise UserInputError(f"{type(callback).__name__} needs a {role} ({contract.__name__}); this run has none")
    missing = [name for name in members(contract) if not hasattr(value, name)]
    if missing:
        raise UserInputError(
            f"{type(callback).__name__} reads the {role}'s `{missing[0]}` ({contract.__name__}), which "
            f"{type(value).__name__} does not have"
        )
