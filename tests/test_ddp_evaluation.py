"""Evaluation under DDP with 2 CPU processes equals the 1-process run: files, summaries and logged metrics.

An odd number of questions makes `DistributedSampler` pad one rank with a repeated question: it must count once.
Sampled evaluation gives every question the same samples whatever the batch size, process count or subset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_dir, run_main, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow  # several CLI runs, two of them with 2 processes each

QUESTIONS = ["--data.val_size", "5", "--data.test_limit", "5", "--data.eval_batch_size", "1"]
REPEATS = ["--model.init_args.generation.repeats", "3", "--model.init_args.generation.at_k", "[1,3]",
           "--model.init_args.generation.decoding.temperature", "1.0"]  # fmt: skip
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
SAMPLED = ["--data.test_limit", "6", "--model.init_args.generation.repeats", "4",
           "--model.init_args.generation.at_k", "[1,4]", "--model.init_args.generation.decoding.temperature", "1.0",
           "--model.init_args.generation.decoding.top_k", "50"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    """A short LoRA + planning-token fit: its last checkpoint."""
    save_dir = tmp_path_factory.mktemp("ddp-eval")
    assert run_main(["fit", *tiny_args(tiny_llama, save_dir, "--trainer.max_steps", "2", *QUESTIONS)]) == 0
    return run_dir(save_dir) / "checkpoints/last.ckpt"


def cli(args: list[str], processes: int) -> None:
    if processes == 1:
        assert run_main(args) == 0
        return
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args, *DDP], capture_output=True, text=True,
                            cwd=REPO, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def outputs(run: Path) -> dict[str, object]:
    """Every JSON / JSONL output of a run (by relative path) and every logged scalar (by tag)."""
    found: dict[str, object] = {}
    for path in sorted(run.rglob("*.json*")):
        text = path.read_text()
        found[str(path.relative_to(run))] = (
            [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
        )
    events = EventAccumulator(str(run))
    events.Reload()
    for tag in events.Tags()["scalars"]:
        found[f"scalar:{tag}"] = [round(event.value, 5) for event in events.Scalars(tag)]
    return found


def compare(tiny_llama: Path, tmp_path: Path, subcommand: str, *extra: str, experiment: str = "planning_gsm8k"):
    runs = []
    for processes in (1, 2):
        save_dir = tmp_path / f"p{processes}"
        cli([subcommand, *tiny_args(tiny_llama, save_dir, *QUESTIONS, *extra)], processes)
        runs.append(outputs(next((save_dir / experiment).glob("version_*"))))
    single, distributed = runs
    assert single.keys() == distributed.keys()
    for key in single:
        assert distributed[key] == single[key], key
    return single


def test_validate(tiny_llama, tmp_path, trained):
    found = compare(tiny_llama, tmp_path, "validate", "--ckpt_path", str(trained))
    samples = next(value for key, value in found.items() if key.startswith("samples/val_step"))
    assert len(samples) == 5 and len({row["id"] for row in samples}) == 5
    accuracy = sum(row["correct"] for row in samples) / 5
    assert found["scalar:val/accuracy"] == [round(accuracy, 5)] and "scalar:val/loss" in found


def test_test_greedy_and_with_repeats(tiny_llama, tmp_path, trained):
    found = compare(tiny_llama, tmp_path / "greedy", "test", "--ckpt_path", str(trained))
    summary = next(value for key, value in found.items() if key.endswith("_summary.json"))
    assert summary["questions"] == 5 and found["scalar:test/accuracy"] == [round(summary["accuracy"], 5)]

    found = compare(tiny_llama, tmp_path / "repeats", "test", "--ckpt_path", str(trained), *REPEATS)
    rows = next(value for key, value in found.items() if key.startswith("samples/test_step") and key.endswith(".jsonl"))
    summary = next(value for key, value in found.items() if key.endswith("_summary.json"))
    assert len(rows) == 5 and all(len(row["completions"]) == 3 for row in rows)
    for name in ("maj@3", "pass@3"):
        expected = sum(row["metrics"][name] for row in rows) / 5
        assert summary[name] == pytest.approx(expected) and found[f"scalar:test/{name}"] == [round(expected, 5)]


def test_slot_arms(tiny_llama, tmp_path):
    slot = ["--config", str(REPO / "configs/slot.yaml"), "--model.init_args.backbone.name", str(tiny_llama),
            "--model.init_args.generation.max_new_tokens", "6", "--data.test_limit", "5",
            "--data.eval_batch_size", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    runs = []
    for processes in (1, 2):
        save_dir = tmp_path / f"p{processes}"
        cli(["test", *slot, "--trainer.logger.init_args.save_dir", str(save_dir)], processes)
        runs.append(outputs(next((save_dir / "slot").glob("version_*"))))
    assert runs[0] == runs[1]
    summary = next(value for key, value in runs[0].items() if key.endswith("summary.json"))
    assert len(summary["arms"]) == 2 and all(entry["questions"] == 5 for entry in summary["arms"].values())
    for arm, entry in summary["arms"].items():
        assert runs[0][f"scalar:test/{arm}/accuracy"] == [round(entry["accuracy"], 5)]


def sample_lists(run: Path) -> dict[str, list[str]]:
    """Question id -> its samples, from a `test` run's samples file."""
    path = next((run / "samples").glob("test_step*.jsonl"))
    return {row["id"]: row["completions"] for row in map(json.loads, path.read_text().splitlines())}


def changed(rows: dict[str, list[str]], reference: dict[str, list[str]]) -> str:
    """How many of the questions in both runs got other samples (for the assertion message)."""
    common = rows.keys() & reference.keys()
    return f"{sum(rows[q] != reference[q] for q in common)} of {len(common)} questions got other samples"


@pytest.fixture(scope="module")
def sampled(tiny_llama, tmp_path_factory, trained) -> dict[str, dict[str, list[str]]]:
    """Sampled `test` (4 samples per question, 6 questions) at eval_batch_size 1, 2, 3, and with test_limit 3."""
    found = {}
    for name, extra in [("batch1", ["--data.eval_batch_size", "1"]), ("batch2", ["--data.eval_batch_size", "2"]),
                        ("batch3", ["--data.eval_batch_size", "3"]),
                        ("limit3", ["--data.eval_batch_size", "2", "--data.test_limit", "3"])]:  # fmt: skip
        save_dir = tmp_path_factory.mktemp(name)
        cli(["test", *tiny_args(tiny_llama, save_dir, *SAMPLED, *extra), "--ckpt_path", str(trained)], 1)
        found[name] = sample_lists(run_dir(save_dir))
    return found


def test_sampled_test_does_not_depend_on_the_batch_size(sampled):
    reference = sampled["batch1"]
    assert len(reference) == 6 and all(len(set(samples)) > 1 for samples in reference.values())
    for name in ("batch2", "batch3"):
        assert sampled[name] == reference, f"{name}: {changed(sampled[name], reference)}"


def test_sampled_test_does_not_depend_on_the_other_questions(sampled):
    subset, reference = sampled["limit3"], sampled["batch1"]
    assert len(subset) == 3 and subset.keys() < reference.keys()
    assert subset == {q: reference[q] for q in subset}, changed(subset, reference)


def test_sampled_test_on_2_processes_equals_1_at_batch_size_2(tiny_llama, tmp_path, trained, sampled):
    """6 questions, batches of 2: one process pairs questions (1, 2), (3, 4), (5, 6) by position, two processes
    (1, 3), (5) and (2, 4), (6); every output is still the same, and the samples are those of batch size 1."""
    found = compare(tiny_llama, tmp_path, "test", "--ckpt_path", str(trained), *SAMPLED, "--data.eval_batch_size", "2")
    rows = next(value for key, value in found.items() if key.startswith("samples/test_step") and key.endswith(".jsonl"))
    assert {row["id"]: row["completions"] for row in rows} == sampled["batch1"]
