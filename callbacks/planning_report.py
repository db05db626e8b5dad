"""Planning-token report: how often each planning token type is generated vs. found in the gold solutions."""

from __future__ import annotations

from collections import Counter

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from callbacks.contracts import CountsGoldTypes, EvaluatesRows, HasPlanning, require
from core.io import write_json_atomic
from core.run_directory import run_directory

SPLITS = {"val": "validation", "test": "test"}


class PlanningReport(L.Callback):
    """After validation and test, for every planning key: mean count per question in the generations
    (the general prefix given in the prompt included) and in the planned gold solutions of the same
    questions, and the share of generations that follow the trained layout (planning tokens, step text,
    answer line). Written to `planning/{val,test}_step{N}.json` and TensorBoard (`{stage}/planning/...`);
    the latest report stays in `latest` (with its "path"). Does nothing when the model has no planning tokens."""

    def __init__(self) -> None:
        self.latest: dict | None = None

    def setup(self, trainer, module, stage: str) -> None:
        require(self, "model", module, EvaluatesRows)
        require(self, "model", module, HasPlanning)
        if stage != "predict":  # validation and test read its gold types
            require(self, "datamodule", trainer.datamodule, CountsGoldTypes)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, module, "val", trainer.global_step)

    def on_test_end(self, trainer, module) -> None:
        self._report(trainer, module, "test", max(trainer.global_step, module.checkpoint_global_step))

    def _report(self, trainer, module, stage: str, step: int) -> None:
        planning = module.planning
        if planning is None or not planning.active:  # the same on every rank: no collective skipped
            return
        rows = module.evaluation_rows
        rows = [row for row in rows if row.arm == rows[0].arm] if rows else []  # SLOT: the baseline arm
        gold_by_id = trainer.datamodule.gold_types.get(SPLITS[stage], {})
        run_dir = run_directory(trainer)  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero or not rows:
            return
        generated, gold, layout = Counter(), Counter(), 0.0
        for row in rows:  # per question: the mean over its samples
            for completion in row.completions:
                counts = planning.count_types(planning.eval_prefix() + completion)
                generated.update({key: count / len(row.completions) for key, count in counts.items()})
                layout += planning.follows_layout(planning.eval_prefix() + completion) / len(row.completions)
            gold.update(gold_by_id.get(row.id, {}))
        keys = planning.key_tokens()
        report = {
            "questions": len(rows),
            "layout_share": layout / len(rows),
            "per_question": {
                key: {"generated": generated[key] / len(rows), "gold": gold[key] / len(rows)} for key in keys
            },
        }
        path = run_dir / "planning" / f"{stage}_step{step}.json"
        write_json_atomic(path, report)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for key, values in report["per_question"].items():
                    for kind, value in values.items():
                        logger.experiment.add_scalar(f"{stage}/planning/{key}_{kind}", value, step)
                logger.experiment.add_scalar(f"{stage}/planning/layout_share", report["layout_share"], step)
        self.latest = {**report, "path": str(path)}
        rank_zero_info(f"Planning-token report: {path}")
