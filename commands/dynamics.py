"""`python cli.py dynamics`: likelihood dynamics of a sample pool over every checkpoint of a run.

Outputs (in `--output`, default `<folder>/dynamics_offline`): `checkpoints/<name>.json` per checkpoint (per-sample
metrics), `summary.json` (all checkpoints, by type) and TensorBoard events in `tensorboard/`. Every file is
written atomically; a rerun reuses every per-checkpoint file computed with the same pool and settings, so
an interrupted run recomputes nothing already written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import UserInputError
from core.io import atomic_directory, write_json_atomic
from evaluation.likelihood import (
    ScoringSpec,
    build_summary,
    load_pool,
    scalar_tags,
    score_pool,
    settings_record,
)
from models.checkpoints import (
    BASE_NAME,
    Checkpoint,
    CheckpointModels,
    base_model,
    checkpoint_stamp,
    describe_checkpoint,
    discover_checkpoints,
    reusable_record,
)
from models.loading import ModelSpec, load_tokenizer

log = logging.getLogger(__name__)


def dynamics(
    folder: str | None = None,
    pool: str | None = None,
    model: ModelSpec | None = None,
    scoring: ScoringSpec | None = None,
    output: str | None = None,
    types: list[str] | None = None,
    device: str = "auto",
    checkpoint: str | None = None,
    with_base: bool = False,
) -> dict:
    """Score a typed sample pool with the base model (step 0) and every checkpoint in FOLDER, or with ONE
    checkpoint (`--checkpoint`).

    Checkpoints: HF `checkpoint-<N>/` folders (full or LoRA adapter), `epoch_<N>/` exports and Lightning
    `*.ckpt` files (also under `checkpoints/`), in step order. A checkpoint that cannot be read (e.g. a
    half-written folder) is named in the log and in summary.json's "skipped", and skipped; a rerun tries it again.

    Args:
        folder: the run folder holding the checkpoints.
        pool: the sample pool, a JSON list (or JSONL) of {"instruction", "input", "output", "type"}.
        checkpoint: instead of a folder, one checkpoint (a `.ckpt`, an `epoch_N/` export, an HF `checkpoint-N/`
            or any HF model or adapter folder); the output is one JSON file (`--output`, default
            `<checkpoint>.dynamics.json` beside it) in summary.json's format.
        with_base: with `--checkpoint`, also score the base model (step 0).
        model: the base model (step 0, and the base of adapter checkpoints); None = the embedded default. A run
            recorded on another backbone is refused until its base model is given here.
        scoring: prompt format, response-only or all-token scoring, batch size, head chunk size.
        output: where the outputs go; None = FOLDER/dynamics_offline (the live callback writes FOLDER/dynamics).
        types: score only these sample types (None = all).
        device: cpu, cuda, or auto (cuda when available).
    """
    if (folder is None) == (checkpoint is None) or pool is None:
        raise UserInputError("dynamics: give --pool and either --folder (a run) or --checkpoint (one checkpoint)")
    scoring = scoring or ScoringSpec()
    samples = load_pool(pool, types)
    if checkpoint is not None:
        return score_one_checkpoint(describe_checkpoint(checkpoint), samples, model, scoring, output, with_base, device)
    discovery = discover_checkpoints(folder)
    for problem in discovery.problems:
        log.warning("skipped %s: %s", problem["checkpoint"], problem["reason"])
    backbone = base_model(model, discovery.checkpoints)
    out = Path(output) if output else Path(folder) / "dynamics_offline"
    settings = {**settings_record(scoring, samples), "base_model": backbone.name}
    header = {
        "model_folder": str(folder),
        "base_model": asdict(backbone),
        "pool": str(pool),
        "settings": settings,
        "skipped": discovery.problems,
    }
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models, tokenizer = CheckpointModels(backbone, device), load_tokenizer(backbone)
    records = []
    for checkpoint in tqdm(discovery.checkpoints, desc="checkpoints"):
        path = out / "checkpoints" / f"{checkpoint.name}.json"
        record = reusable_record(path, settings, checkpoint)
        if record is None:
            try:
                record = score_checkpoint(models, tokenizer, checkpoint, samples, scoring, settings)
            except UserInputError as error:
                log.warning("skipped %s: %s", checkpoint.name, error)
                header["skipped"].append({"checkpoint": checkpoint.name, "reason": str(error)})
                continue
            write_json_atomic(path, record)
        records.append(record)
        write_json_atomic(out / "summary.json", build_summary(records, header))
        write_events(out / "tensorboard", records)
    summary = build_summary(records, header)
    write_json_atomic(out / "summary.json", summary)
    print(f"Dynamics of {len(records)} checkpoints: {out / 'summary.json'}\nTensorBoard: tensorboard --logdir {out}")
    return summary


def score_one_checkpoint(
    checkpoint: Checkpoint,
    samples: list,
    model: ModelSpec | None,
    scoring: ScoringSpec,
    output: str | None,
    with_base: bool,
    device: str,
) -> dict:
    """`dynamics --checkpoint`: one checkpoint (and the base model when asked) into one JSON file."""
    base = Checkpoint(BASE_NAME, 0, None, "base")
    backbone = base_model(model, [checkpoint])
    settings = {**settings_record(scoring, samples), "base_model": backbone.name}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    models, tokenizer = CheckpointModels(backbone, device), load_tokenizer(backbone)
    chosen = [base, checkpoint] if with_base else [checkpoint]
    records = [score_checkpoint(models, tokenizer, item, samples, scoring, settings) for item in chosen]
    header = {"checkpoint": str(checkpoint.path), "base_model": asdict(backbone), "settings": settings, "skipped": []}
    summary = build_summary(records, header)
    path = Path(output) if output else checkpoint.path.with_name(checkpoint.path.name + ".dynamics.json")
    write_json_atomic(path, summary)
    print(f"Dynamics of {checkpoint.name}{' and the base model' if with_base else ''}: {path}")
    return summary


def score_checkpoint(
    models: CheckpointModels, tokenizer, checkpoint: Checkpoint, samples, scoring: ScoringSpec, settings: dict
) -> dict:
    """One checkpoint's per-checkpoint record; any failure to load it is one UserInputError naming it."""
    start = time.perf_counter()
    try:
        with models.model(checkpoint) as model:
            results = score_pool(model, tokenizer, samples, scoring, progress=checkpoint.name)
    except UserInputError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated weight file fails in many ways; one line
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        raise UserInputError(f"{checkpoint.name}: could not be loaded or scored ({message})") from None
    return {
        "checkpoint": checkpoint.name,
        "step": checkpoint.step,
        "path": str(checkpoint.path) if checkpoint.path else None,
        "settings": settings,
        "stamp": checkpoint_stamp(checkpoint),
        "seconds": round(time.perf_counter() - start, 3),
        "results": results,
    }


def write_events(logdir: Path, records: list[dict]) -> None:
    """TensorBoard events of every record (dynamics/<type>/<metric> at each step), replaced atomically."""
    from torch.utils.tensorboard import SummaryWriter

    with atomic_directory(logdir) as staging:
        writer = SummaryWriter(str(staging))
        for record in sorted(records, key=lambda record: record["step"]):
            for tag, value in scalar_tags(record).items():
                writer.add_scalar(tag, value, record["step"])
        writer.close()
