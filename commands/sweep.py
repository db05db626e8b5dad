"""`python cli.py sweep --folder RUN`: accuracy at every checkpoint of a run, on one or more test sets.

Checkpoints are found as `dynamics` finds them (the base model, Lightning `.ckpt` files, `epoch_N/` exports, HF
`checkpoint-N/` folders), loaded by the one loader (`models.loader.load_trained`) and evaluated on the one
evaluation path with the run's own data settings and prompt (its `config.yaml`), as `test --ckpt_path` does.
Outputs, in `RUN/sweep/` (`--output`):

    <task>/<checkpoint>.jsonl   the per-question rows, as `test` writes them
    <task>/<checkpoint>.json    their summary (accuracy with its 95 % interval; maj@k / pass@k with repeats),
                                settings and the checkpoint's file stamp: a rerun reuses it
    summary.json                one row per (checkpoint, task), and per task the last vs the first checkpoint
                                (paired difference, McNemar p, verdict)
    accuracy.png                accuracy vs step with 95 % intervals, one line per task

and TensorBoard scalars `sweep/<task>/accuracy` at each checkpoint's step, written into RUN itself beside the
run's own curves (and the live likelihood dynamics): `tensorboard --logdir RUN` shows them on one step axis.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from tqdm.auto import tqdm

from core.errors import UserInputError
from core.io import atomic_path, check_name, write_json_atomic, write_jsonl_atomic
from datamodules.reasoning import ReasoningDataModule
from evaluation.generation import GenerationSpec
from evaluation.pipeline import evaluate_batch
from evaluation.statistics import paired_comparison
from evaluation.summaries import evaluation_summary
from models.checkpoints import Checkpoint, base_model, checkpoint_stamp, discover_checkpoints, reusable_record
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.examples import get_task
from tasks.prompts import PromptSpec

DATA_SETTINGS = ("task", "test_path", "hub_subset", "answer_format", "prompt", "max_length", "eval_batch_size", "seed")
"""The run's data settings a sweep evaluates with (the others concern training)."""


def sweep(
    folder: str,
    tasks: list[str] | None = None,
    test_paths: list[str] | None = None,
    model: ModelSpec | None = None,
    generation: GenerationSpec | None = None,
    test_limit: int | None = None,
    output: str | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate every checkpoint of the run in FOLDER (the base model first) on its test set or on `tasks`.

    Args:
        folder: the run directory (`runs/<experiment>/version_N`, with the `config.yaml` that fit wrote).
        tasks: tasks to evaluate on (None: the run's own task and test file).
        test_paths: a test file per task in `tasks` (None: each task's bundled test split).
        model: the base model (default: the embedded model); a run recorded on another backbone is refused
            until it is given here, as in `dynamics`.
        generation: decoding, length, repeats and engine (None: the run's own `model.init_args.generation`).
        test_limit: evaluate only the first N questions of each test set (None: all).
        output: where the outputs go (None: FOLDER/sweep).
        device: cpu, cuda, or auto (cuda when available).
    """
    run = Path(folder)
    data, run_generation = run_settings(run)
    generation = generation or run_generation
    evaluations = task_settings(data, tasks, test_paths, test_limit)
    discovery = discover_checkpoints(run)
    for problem in discovery.problems:
        print(f"skipped {problem['checkpoint']}: {problem['reason']}")
    backbone = base_model(model, discovery.checkpoints)
    out = Path(output) if output else run / "sweep"
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = []
    for checkpoint in tqdm(discovery.checkpoints, desc="checkpoints"):
        pending = {}
        for name, settings in evaluations.items():
            settings = {**settings, "generation": asdict(generation), "base_model": backbone.name}
            record = reusable_record(out / name / f"{checkpoint.name}.json", settings, checkpoint)
            if record is None:
                pending[name] = settings
            else:
                results.append(record)
        if pending:
            results += evaluate_checkpoint(backbone, checkpoint, pending, generation, out, device)
    summary = sweep_summary(results, evaluations)
    write_json_atomic(out / "summary.json", summary)
    plot_accuracy(out / "accuracy.png", summary["rows"])
    write_events(run, summary["rows"])
    for row in summary["rows"]:
        low, high = row["accuracy_ci95"]
        print(f"{row['task']:<12} {row['checkpoint']:<28} step {row['step']:>6}  accuracy {row['accuracy']:.4f} "
              f"[{low:.4f}, {high:.4f}]  ({row['questions']} questions)")  # fmt: skip
    print(f"Sweep: {out / 'summary.json'}, {out / 'accuracy.png'}; TensorBoard: tensorboard --logdir {run}")
    return summary


def run_settings(run: Path) -> tuple[dict, GenerationSpec]:
    """The run's data settings and generation spec, from the config.yaml that `fit` saved in it."""
    path = run / "config.yaml"
    if not path.is_file():
        raise UserInputError(f"sweep: {path} not found; the run directory of cli.py fit holds its config.yaml")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        data = {key: value for key, value in (config.get("data") or {}).items() if key in DATA_SETTINGS}
        data["prompt"] = asdict(PromptSpec(**(data.get("prompt") or {})))
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--generation", type=GenerationSpec)
        spec = (config.get("model") or {}).get("init_args", {}).get("generation") or {}
        generation = parser.instantiate_classes(parser.parse_object({"generation": spec})).generation
    except (yaml.YAMLError, TypeError, ValueError, AttributeError) as error:
        raise UserInputError(f"sweep: {path}: unreadable run settings ({str(error).splitlines()[0]})") from None
    return data, generation


def task_settings(
    data: dict, tasks: list[str] | None, test_paths: list[str] | None, limit: int | None
) -> dict[str, dict]:
    """Name -> the data settings of each evaluation (the run's own, or each task's with the run's prompt)."""
    if test_paths is not None and (tasks is None or len(test_paths) != len(tasks)):
        raise UserInputError("sweep: --test_paths needs --tasks, one file per task")
    if tasks is None:
        return {check_name(data.get("task", "gsm8k"), "sweep: task"): {**data, "test_limit": limit}}
    shared = {key: data[key] for key in ("prompt", "max_length", "eval_batch_size", "seed") if key in data}
    evaluations = {}
    for index, name in enumerate(tasks):
        task = get_task(name)
        path = test_paths[index] if test_paths else task.bundled.get("test")
        if path is None:
            raise UserInputError(f"sweep: task '{name}' bundles no test file; give it with --test_paths")
        evaluations[check_name(name, "sweep: task")] = {
            **shared, "task": name, "test_path": str(path), "test_limit": limit
        }  # fmt: skip
    return evaluations


def evaluate_checkpoint(
    backbone: ModelSpec, checkpoint: Checkpoint, pending: dict[str, dict], generation: GenerationSpec, out: Path, device
) -> list[dict]:
    """Load one checkpoint and evaluate it on every pending task; each result written (rows, then record)."""
    start = time.perf_counter()
    trained = load_trained(backbone, checkpoint.path)
    model = trained.model.requires_grad_(False).to(device)
    load_seconds, records = time.perf_counter() - start, []
    for name, settings in pending.items():
        start = time.perf_counter()
        arguments = {key: settings[key] for key in settings if key in DATA_PARAMETERS}
        arguments["prompt"] = PromptSpec(**settings["prompt"])
        datamodule = ReasoningDataModule(**arguments, tokenizer=trained.tokenizer, planning=trained.planning)
        datamodule.setup("test")
        rows = []
        for batch in datamodule.test_dataloader():
            rows += evaluate_batch(model, trained.tokenizer, batch, generation, trained.planning)
        rows.sort(key=lambda row: row.position)
        samples = [row.record() for row in rows]
        write_jsonl_atomic(out / name / f"{checkpoint.name}.jsonl", samples)
        record = {
            "task": name,
            "checkpoint": checkpoint.name,
            "step": checkpoint.step,
            "path": str(checkpoint.path) if checkpoint.path else None,
            "settings": settings,
            "stamp": checkpoint_stamp(checkpoint),
            "seconds": round(time.perf_counter() - start + load_seconds, 3),
            "summary": evaluation_summary(samples),
            "correct": {row["id"]: bool(row["correct"]) for row in samples},
        }
        write_json_atomic(out / name / f"{checkpoint.name}.json", record)
        records.append(record)
        load_seconds = 0.0
    del model, trained
    return records


DATA_PARAMETERS = {"test_limit", *DATA_SETTINGS}


def sweep_summary(records: list[dict], evaluations: dict[str, dict]) -> dict:
    """One row per (checkpoint, task) in step order, and per task the last checkpoint against the first."""
    records = sorted(records, key=lambda record: (list(evaluations).index(record["task"]), record["step"]))
    rows = []
    for record in records:
        metrics = {key: value for key, value in record["summary"].items() if key != "intervals"}
        rows.append({key: record[key] for key in ("task", "checkpoint", "step", "seconds")} | metrics)
    comparisons = {}
    for name in evaluations:
        task_records = [record for record in records if record["task"] == name]
        if len(task_records) > 1:
            first, last = task_records[0], task_records[-1]
            shared = [key for key in first["correct"] if key in last["correct"]]
            before, after = ([record["correct"][key] for key in shared] for record in (first, last))
            ends = {"first": first["checkpoint"], "last": last["checkpoint"]}
            comparisons[name] = {**ends, **paired_comparison(before, after)}
    return {"rows": rows, "last_vs_first": comparisons}


def plot_accuracy(path: Path, rows: list[dict]) -> None:
    """Accuracy vs step with 95 % intervals, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for task in dict.fromkeys(row["task"] for row in rows):
        points = [row for row in rows if row["task"] == task]
        steps, values = [row["step"] for row in points], [row["accuracy"] for row in points]
        errors = [[v - row["accuracy_ci95"][0] for v, row in zip(values, points, strict=True)],
                  [row["accuracy_ci95"][1] - v for v, row in zip(values, points, strict=True)]]  # fmt: skip
        axis.errorbar(steps, values, yerr=errors, marker="o", capsize=3, label=task)
    axis.set_xlabel("training step")
    axis.set_ylabel("accuracy (95 % interval)")
    axis.set_ylim(0, 1.05)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def write_events(run: Path, rows: list[dict]) -> None:
    """`sweep/<task>/accuracy` (and maj@k / pass@k) at each checkpoint's step, in one events file in RUN that
    replaces the previous sweep's."""
    from torch.utils.tensorboard import SummaryWriter

    old = list(run.glob("events.out.tfevents.*.sweep"))
    writer = SummaryWriter(log_dir=str(run), filename_suffix=".sweep")
    for row in rows:
        for name, value in row.items():
            if name == "accuracy" or "@" in name and isinstance(value, float):
                writer.add_scalar(f"sweep/{row['task']}/{name}", value, row["step"])
    writer.close()
    for path in old:
        path.unlink(missing_ok=True)
