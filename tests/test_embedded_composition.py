"""On the real embedded model: a planning-token LoRA run evaluated by `test` and by SLOT gives the same baseline."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, read_jsonl, run_cli

from models.loader import read_planning


@pytest.mark.slow
def test_slot_baseline_on_a_planning_run_equals_its_test(readme_main_job, tmp_path):
    """README command 1's run, then `test --ckpt_path last` and SLOT's baseline arm on its `epoch_0` with the
    run's prompt and answer format: the same completions, planning prefix included in both prompts."""
    run, _ = readme_main_job
    run_config = ["--config", str(REPO / "configs/planning_gsm8k.yaml"),
                  "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
                  "--trainer.logger.init_args.save_dir", str(run.parents[1]),
                  "--trainer.enable_progress_bar", "false"]  # fmt: skip
    questions = ["--data.test_limit", "3", "--data.eval_batch_size", "3", "--model.init_args.generation.max_new_tokens",
                 "40"]  # fmt: skip
    run_cli("test", *run_config, *questions, "--ckpt_path", "last")
    tested = {row["id"]: row for row in read_jsonl(run / "samples/test_step32.jsonl")}

    info = json.loads((run / "epoch_0/training_info.json").read_text())
    run_cli("test", "--config", str(REPO / "configs/slot.yaml"), *questions,
            "--model.init_args.checkpoint", str(run / "epoch_0"), "--model.init_args.arms", "[{iters: 0}]",
            "--data.prompt.system_prompt", "null", "--data.prompt.style", info["prompt"]["style"],
            "--data.answer_format", "gsm8k", "--trainer.logger.init_args.save_dir", str(tmp_path / "slot"),
            "--trainer.enable_progress_bar", "false")  # fmt: skip
    arms = next((tmp_path / "slot/slot").glob("version_*/samples/test_step32"))
    baseline = read_jsonl(arms / "log_times_0_lr_0.1.jsonl")
    assert len(baseline) == 3
    prefix = read_planning(run / "epoch_0").eval_prefix()
    for row in baseline:
        assert prefix and row["prompt"].endswith(prefix)  # the planning prefix it trained with
        assert row["completion"] == tested[row["id"]]["completion"]
        assert row["correct"] == tested[row["id"]]["correct"]
