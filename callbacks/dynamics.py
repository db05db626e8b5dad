"""Live likelihood dynamics: during `fit`, score a typed sample pool with the current weights whenever a
checkpoint is saved (and/or every N steps) and log per-type averages to TensorBoard at that step.

Outputs in `{run dir}/dynamics/` have the layout of the offline `dynamics` command: `checkpoints/<name>.json`
(per-sample metrics) and `summary.json` (all steps so far, by type); the base model is step 0, scored before
training starts. A run resumed in place keeps the steps it already scored.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from callbacks.contracts import HasPrompt, HoldsModel, require
from callbacks.slurm import SlurmRequeue
from core.io import write_json_atomic
from core.run_directory import run_directory
from evaluation.likelihood import ScoringSpec, build_summary, load_pool, scalar_tags, score_pool, settings_record
from evaluation.undisturbed import undisturbed
from tasks.examples import DATA_DIR
from tasks.prompts import PromptSpec

BUNDLED_POOL = DATA_DIR / "dynamics/pool.json"


class LikelihoodDynamics(L.Callback):
    """Scores a sample pool at each checkpoint of `fit`: TensorBoard tags `dynamics/<type>/<metric>`
    (log_likelihood, perplexity, token_count, entropy) at the step, and `{run dir}/dynamics/summary.json`.

    DDP: rank 0 scores with its own copy of the weights and writes; other ranks go on (FSDP's sharded
    weights are not supported). Scoring leaves training as it was: only the dropout layers switch off, and the
    global RNG is restored after it (`evaluation.undisturbed`).

    Args:
        pool: the sample pool, a JSON list (or JSONL) of {"instruction", "input", "output", "type"};
            None = the bundled data/dynamics/pool.json (GSM8K: train, test and test_mismatched samples).
        on_checkpoint: score every time a checkpoint is saved.
        every_n_steps: also score every N optimizer steps (0 = only at checkpoints).
        prompt: the prompt format; None = the datamodule's (the format training uses).
        score: response: the response tokens given the prompt; all: every token after the first.
        score_eos: also score an EOS after the response (off: the response tokens only, as the reference).
        types: score only these sample types (None = all).
        batch_size: sequences per forward pass.
        chunk_tokens: scored positions per output-head chunk.
    """

    def __init__(
        self,
        pool: str | None = None,
        on_checkpoint: bool = True,
        every_n_steps: int = 0,
        prompt: PromptSpec | None = None,
        score: Literal["response", "all"] = "response",
        score_eos: bool = False,
        types: list[str] | None = None,
        batch_size: int = 8,
        chunk_tokens: int = 1024,
    ) -> None:
        self.pool, self.types = pool, types
        self.on_checkpoint, self.every_n_steps = on_checkpoint, every_n_steps
        self.prompt = prompt
        self.spec = ScoringSpec(score=score, score_eos=score_eos, batch_size=batch_size, chunk_tokens=chunk_tokens)
        self.samples: list = []
        self.records: dict[int, dict] = {}
        self.directory: Path | None = None
        self.last_end = 0.0

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require(self, "model", module, HoldsModel)
        if self.prompt is None:
            require(self, "datamodule", trainer.datamodule, HasPrompt)
        self.samples = load_pool(self.pool or BUNDLED_POOL, self.types)
        self.spec = replace(self.spec, prompt=self.prompt or trainer.datamodule.prompt)
        self.settings = settings_record(self.spec, self.samples)
        self.directory = run_directory(trainer) / "dynamics"  # every rank: a broadcast under DDP
        self.records = {}
        for path in (self.directory / "checkpoints").glob("*.json"):  # resumed in place
            record = json.loads(path.read_text())
            if record.get("settings") == self.settings:
                self.records[record["step"]] = record

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._score(trainer, module)  # the base model
        self.last_end = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step and trainer.global_step % self.every_n_steps == 0:
            self._score(trainer, module)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        # not on the hpc save at SLURM's time limit: the requeued job scores its own checkpoints
        if self.on_checkpoint and not trainer.sanity_checking and not SlurmRequeue.requeue_pending(trainer):
            self._score(trainer, module)

    def _score(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step in self.records or self.directory is None:
            return
        if not trainer.is_global_zero:
            self.records[step] = {}  # rank 0 has it
            return
        start = time.perf_counter()
        with undisturbed(module.model):
            results = score_pool(module.model, module.tokenizer, self.samples, self.spec, progress=f"dynamics {step}")
        end = time.perf_counter()
        name = "base_model" if step == 0 else f"step-{step}"
        record = {
            "checkpoint": name,
            "step": step,
            "path": None,
            "settings": self.settings,
            "seconds": round(end - start, 3),
            "train_seconds": round(start - self.last_end, 3) if step else None,
            "results": results,
        }
        self.last_end = end
        self.records[step] = record
        write_json_atomic(self.directory / "checkpoints" / f"{name}.json", record)
        header = {
            "run_dir": str(self.directory.parent),
            "pool": str(self.pool or BUNDLED_POOL),
            "settings": self.settings,
            "base_model": asdict(module.backbone),
        }
        summary = build_summary([r for r in self.records.values() if r], header)
        write_json_atomic(self.directory / "summary.json", summary)
        for logger in trainer.loggers:
            logger.log_metrics(scalar_tags(record), step=step)
        rank_zero_info(f"Likelihood dynamics at step {step}: {self.directory / 'summary.json'}")
