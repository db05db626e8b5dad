"""configs/slot.yaml renders and scores as the reference's eval_only_slot.py: the same system prompt string, the same
prompt ids, its strict format check (with ours reported beside it as `format_accuracy_lenient`)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import REPO

from cli import build_cli
from lightning_modules.slot_eval import R1_FORMAT, format_checks

# eval_only_slot.py's `system_prompt`: a triple-quoted string whose first line ends in a backslash, so Python joins
# "...with the answer." and "The reasoning process..." without a space; "and<answer>" has none either.
REFERENCE_SYSTEM_PROMPT = (
    "You are a helpful assistant. A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer.The reasoning process and answer are enclosed within <think> </think> and<answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)


def test_the_config_holds_the_reference_system_prompt():
    config = yaml.safe_load((REPO / "configs/slot.yaml").read_text())
    assert config["data"]["prompt"]["system_prompt"] == REFERENCE_SYSTEM_PROMPT
    assert config["data"]["prompt"]["style"] == "chat" and config["data"]["answer_format"] == "last_number"
    assert config["model"]["init_args"]["generation"]["max_new_tokens"] == 512  # greedy by default


def test_prompt_ids_are_the_reference_recipe(tiny_llama, tmp_path):
    """The reference: apply_chat_template([system, user], add_generation_prompt=True, tokenize=False), then the
    tokenizer with add_special_tokens=False."""
    cli = build_cli(["--config", str(REPO / "configs/slot.yaml"), "--model.init_args.backbone.name",
                     str(tiny_llama), "--data.test_limit", "3", "--data.eval_batch_size", "1",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)  # fmt: skip
    datamodule, tokenizer = cli.datamodule, cli.model.tokenizer
    datamodule.setup("test")
    questions = {json.loads(line)["question"] for line in (REPO / "data/gsm8k/test.jsonl").open()}
    for batch in datamodule.test_dataloader():
        question = batch["question"][0]
        assert question in questions  # the bundled question, as the dataset gives it
        ids = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
        messages = [{"role": "system", "content": REFERENCE_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        reference = tokenizer(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        ).input_ids
        assert ids == reference


@pytest.mark.parametrize(
    ("completion", "strict", "lenient"),
    [
        ("<think>48 + 24 = 72</think><answer>72</answer>", True, True),
        ("<think>two\nlines</think><answer>72</answer>", True, True),  # DOTALL
        ("<think>a</think><answer>72</answer>\n", True, True),  # `$` also matches before a final newline
        ("<think>a</think> <answer>72</answer>", False, True),  # a space between the tags
        ("<think>a</think>\n<answer>72</answer>", False, True),
        (" <think>a</think><answer>72</answer>", False, True),  # not at the start (no strip)
        ("<think>a</think><answer>72</answer> Done.", False, False),
        ("The answer is 72.", False, False),
        ("<think>a</think>", False, False),
    ],
)
def test_format_check_is_the_reference_match_and_ours_the_lenient_one(completion, strict, lenient):
    assert format_checks(re.compile(R1_FORMAT, re.DOTALL), completion) == {
        "format_ok": strict,
        "format_ok_lenient": lenient,
    }
