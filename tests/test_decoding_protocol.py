"""The decoding study runs upstream's lm-eval task (Sample-Smart-Not-Hard eval/maths/gsm8k_fewshot.yaml): golden
prompt, stop strings and length, and the task's scoring through the evaluation pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO

import evaluation.pipeline
from cli import build_cli
from evaluation.pipeline import evaluate_batch
from tasks.lm_eval_source import LmEvalScorer, build_requests, load_task

STUDY = REPO / "configs/decoding_gsm8k.yaml"
GREEDY = REPO / "configs/decoding/greedy.yaml"
# Upstream's prompt, written from its YAML: lm-eval's first_n sampler takes the first 5 of its 8 listed exemplars,
# each rendered as doc_to_text "Question: {{question}}\n Answer: " + target delimiter " " + target, joined by the
# few-shot delimiter "\n\n"; then the question's own doc_to_text.
FIVE_SHOTS = (
    "Question: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
    "done, there will be 21 trees. How many trees did the grove workers plant today?\n Answer:  There are 15 trees "
    "originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The "
    "answer is 6.\n\n"
    "Question: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking "
    "lot?\n Answer:  There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n"
    "Question: Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
    "total?\n Answer:  Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
    "After eating 35, they had 74 - 35 = 39. The answer is 39.\n\n"
    "Question: Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
    "lollipops did Jason give to Denny?\n Answer:  Jason started with 20 lollipops. Then he had 12 after giving "
    "some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.\n\n"
    "Question: Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
    "have now?\n Answer:  Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 "
    "more toys. 5 + 4 = 9. The answer is 9.\n\n"
)
GOLDEN = {
    "test-0": FIVE_SHOTS + "Question: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every "
    "morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?\n Answer: ",
    "test-1": FIVE_SHOTS + "Question: A robe takes 2 bolts of blue fiber and half that much white fiber.  How many "
    "bolts in total does it take?\n Answer: ",
}
UPSTREAM_STOPS = ["Question:", "</s>", "<|im_end|>", "<|endoftext|>", "You are an AI assistant"]


def study(model: Path, tmp_path: Path, *extra: str):
    args = ["--config", str(STUDY), "--model.init_args.backbone.name", str(model),
            "--trainer.logger.init_args.save_dir", str(tmp_path), *extra]  # fmt: skip
    return build_cli(args, run=False)


def test_the_study_renders_upstreams_prompt_stops_and_length(tiny_llama, tmp_path):
    spec = study(tiny_llama, tmp_path, "--config", str(GREEDY)).datamodule.lm_eval
    task = load_task(spec)
    requests = build_requests(task, spec, [0, 1])
    assert {request.id: request.context for request in requests} == GOLDEN
    assert [request.target for request in requests] == ["18", "3"]  # doc_to_target: the text after "####"
    scorer = LmEvalScorer(task, requests, spec.max_gen_toks)
    assert scorer.stop == UPSTREAM_STOPS and scorer.max_new_tokens == 200


def test_the_pipeline_generates_with_the_tasks_stops_and_scores_with_its_filters(tiny_llama, tmp_path, monkeypatch):
    cli = study(tiny_llama, tmp_path, "--data.test_limit", "2", "--model.init_args.generation.repeats", "8",
                "--data.max_length", "4096")  # fmt: skip
    data = cli.datamodule
    data.setup("test")
    for example, row in zip(data.test_examples, data.splits["test"], strict=True):  # the prompt, as lm-eval encodes it
        assert example.prompt == FIVE_SHOTS + example.question and example.question.endswith("\n Answer: ")
        assert row["prompt_ids"] == data.tokenizer(example.prompt).input_ids
    batch = next(iter(data.test_dataloader()))
    asked = {}
    gold = dict(zip(batch["id"], batch["answer"], strict=True))
    samples = {question_id: ["Hmm."] * 5 + [f"So {gold[question_id]}. The answer is {gold[question_id]}."] * 3
               for question_id in batch["id"]}  # fmt: skip

    def scripted(model, tokenizer, prompt_ids, prompt_mask, spec, **kwargs):
        asked["spec"] = spec
        return [text for question_id in batch["id"] for text in samples[question_id]]

    monkeypatch.setattr(evaluation.pipeline, "generate", scripted)
    generation = cli.model.generation
    rows = evaluate_batch(
        SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32), data.tokenizer, batch, generation
    )
    assert asked["spec"].stop == UPSTREAM_STOPS and asked["spec"].max_new_tokens == 200
    assert asked["spec"].decoding == generation.decoding and asked["spec"].repeats == 8
    for row in rows:
        assert row.predictions == ["[invalid]"] * 5 + [row.answer] * 3
        assert row.samples_correct == [False] * 5 + [True] * 3
        assert (row.prediction, row.correct) == ("[invalid]", False)  # five unparsable samples outvote three
        assert row.metrics["maj@8"] == row.extra["lm_eval"]["maj@8"]["exact_match"] == 0.0
        assert row.extra["lm_eval"]["score-first"]["exact_match"] == 0.0 and row.metrics["pass@8"] == 1.0
        assert set(row.extra["lm_eval"]) == {"score-first", "maj@8"}  # maj@16 / maj@32 need more samples
        assert json.loads(json.dumps(row.record()))["lm_eval"] == row.extra["lm_eval"]
    with pytest.warns(UserWarning, match="replace model.generation's stop and max_new_tokens"):
        evaluate_batch(SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32), data.tokenizer, batch,
                       type(generation)(**{**vars(generation), "max_new_tokens": 7}))  # fmt: skip
    assert asked["spec"].max_new_tokens == 200
