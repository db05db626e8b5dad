"""`cli.py sweep`: every checkpoint of a run evaluated as `test` evaluates it; resumable; curves on the run's axis."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import read_jsonl, run_main, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import commands.sweep
from commands.sweep import sweep
from models.loading import ModelSpec

pytestmark = pytest.mark.slow
LIMIT = ("--data.test_limit", "4")


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory) -> Path:
    """A 3-epoch LoRA + planning-token run of the tiny model: epoch_0/ (step 2), epoch_1/ (step 4), and the
    Lightning checkpoint of step 6 (preferred to epoch_2/, the same weights)."""
    save_dir = tmp_path_factory.mktemp("sweep-run")
    args = tiny_args(tiny_llama, save_dir, "--trainer.max_epochs", "3", "--data.train_limit", "8",
                     "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "1",
                     "--trainer.limit_val_batches", "0")  # fmt: skip
    assert run_main(["fit", *args]) == 0
    return save_dir / "planning_gsm8k/version_0"


def rows_by_id(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_jsonl(path)}


def test_each_checkpoint_scores_as_test_does(run, tiny_llama, tmp_path):
    summary = sweep(str(run), model=ModelSpec(name=str(tiny_llama)), test_limit=4)
    rows = summary["rows"]
    assert [(row["checkpoint"], row["step"]) for row in rows] == [
        ("base_model", 0), ("epoch_0", 2), ("epoch_1", 4), ("epoch2-step6.ckpt", 6)
    ]  # fmt: skip
    assert all(row["questions"] == 4 and row["task"] == "gsm8k" for row in rows)
    # `test --ckpt_path` on the Lightning checkpoint, and `test` on an export as the SLURM evaluations run it
    runs = {
        "epoch2-step6.ckpt": ["--ckpt_path", str(run / "checkpoints/epoch2-step6.ckpt")],
        "epoch_0": ["--model.init_args.backbone.name", str(run / "epoch_0"), "--model.init_args.mode", "full"],
    }
    for name, extra in runs.items():
        save_dir = tmp_path / name
        assert run_main(["test", *tiny_args(tiny_llama, save_dir, *LIMIT), *extra]) == 0
        (samples,) = (save_dir / "planning_gsm8k").glob("version_*/samples/test_step*.jsonl")
        tested, swept = rows_by_id(samples), rows_by_id(run / "sweep/gsm8k" / f"{name}.jsonl")
        assert tested.keys() == swept.keys()
        for key, row in tested.items():
            assert (swept[key]["completion"], swept[key]["correct"]) == (row["completion"], row["correct"]), name
        row = next(row for row in rows if row["checkpoint"] == name)
        assert row["accuracy"] == sum(r["correct"] for r in tested.values()) / 4
    comparison = summary["last_vs_first"]["gsm8k"]
    assert (comparison["first"], comparison["last"]) == ("base_model", "epoch2-step6.ckpt")
    events = EventAccumulator(str(run)).Reload()
    assert [event.step for event in events.Scalars("sweep/gsm8k/accuracy")] == [0, 2, 4, 6]
    assert (run / "sweep/accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_sweep_recomputes_nothing_and_an_interrupted_one_resumes(run, tiny_llama, monkeypatch):
    spec = ModelSpec(name=str(tiny_llama))
    first = sweep(str(run), model=spec, tasks=["aqua"], test_limit=2)
    evaluated = []
    original = commands.sweep.evaluate_checkpoint

    def counting(backbone, checkpoint, *args):
        evaluated.append(checkpoint.name)
        if checkpoint.name == "epoch_1" and len(evaluated) == 1:
            raise KeyboardInterrupt  # killed while evaluating epoch_1
        return original(backbone, checkpoint, *args)

    monkeypatch.setattr(commands.sweep, "evaluate_checkpoint", counting)
    again = sweep(str(run), model=spec, tasks=["aqua"], test_limit=2)
    assert evaluated == [] and again["rows"] == first["rows"]
    for name in ("epoch_1", "epoch2-step6.ckpt"):
        (run / "sweep/aqua" / f"{name}.json").unlink()  # as if the sweep had been killed before these
    with pytest.raises(KeyboardInterrupt):
        sweep(str(run), model=spec, tasks=["aqua"], test_limit=2)
    resumed = sweep(str(run), model=spec, tasks=["aqua"], test_limit=2)
    assert evaluated == ["epoch_1", "epoch_1", "epoch2-step6.ckpt"]  # the finished ones were never redone
    assert [row["accuracy"] for row in resumed["rows"]] == [row["accuracy"] for row in first["rows"]]


def test_a_run_without_its_config_is_one_line(tmp_path, capsys):
    (tmp_path / "epoch_0").mkdir()
    assert run_main(["sweep", "--folder", str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
