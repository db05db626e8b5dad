"""lm-eval tasks as a data source: our prompts, stops and scores equal lm-eval's own run of the same task."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
import yaml
from helpers import REPO
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from core.errors import UserInputError
from datamodules.reasoning import ReasoningDataModule
from evaluation.sampling_metrics import question_metrics
from tasks.lm_eval_source import LmEvalSpec
from tasks.prompts import PromptSpec
from tasks.scoring import score_completion

SHIPPED = REPO / "configs/lm_eval/gsm8k_fewshot.yaml"
LM_EVAL_GSM8K = Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml"
# Hand-written completions of the first 8 bundled GSM8K test questions (gold 18, 3, 70000, 540, 20, 64, 260, 160):
# with and without "The answer is", with "$", commas, trailing periods, units, "####", "is:", and no answer.
SINGLE = [
    "She sells 9 eggs for $2 each, 9 * 2 = $18. The answer is $18.",
    "2 + 1 = 3 bolts. The answer is 3",
    "He made a profit of $70,000.\nThe answer is 70,000.",
    "3 * 3 * 60 = 540 meters.\n#### 540",
    "The answer is: 20.",
    "The answer is 64 dollars.",
    "I cannot tell.",
    "The answer is 160 minutes. So the answer is 150.",
]
# upstream's strict filter + exact_match on SINGLE, worked out by hand from its YAML
UPSTREAM_CORRECT = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
INVALID, FIVE = "I do not know.", "The answer is 5."
# 8 samples per question for maj@8: unparsable samples vote for "[invalid]" (question 0: 5 of them beat 3 right ones)
REPEATED = [
    [INVALID] * 5 + ["The answer is 18."] * 3,
    ["The answer is 3."] * 3 + [INVALID] * 2 + ["The answer is 4."] * 3,  # a 3:3 tie: the first answer seen wins
    ["The answer is 70,000."] * 2 + [INVALID] * 6,
    [INVALID] + ["The answer is 540."] * 7,
    [FIVE] * 8,
    ["The answer is 64."] * 4 + [INVALID] * 4,
    [INVALID] * 8,
    ["The answer is 160."] + [FIVE] * 2 + [INVALID] * 5,
]


class ScriptedLM(LM):
    """An lm-eval model that answers each question with the given completions, in order, and records requests."""

    def __init__(self, questions: list[str], completions: list[list[str]]) -> None:
        super().__init__()
        self.completions = {q: list(texts) for q, texts in zip(questions, completions, strict=True)}
        self.requests: dict[str, tuple] = {}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            self.requests[request.doc["question"]] = request.args
            outputs.append(self.completions[request.doc["question"]].pop(0))
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def head(path: Path, count: int, out: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    out.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


@pytest.fixture(scope="module")
def task_copies(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Local-json copies of lm-eval's own gsm8k task and of the shipped upstream task (8 samples, maj@8)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    test = head(REPO / "data/gsm8k/test.jsonl", 8, folder / "test.jsonl")
    head(REPO / "data/gsm8k/train.jsonl", 40, folder / "train.jsonl")
    files = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}
    copies = {
        "gsm8k_copy": {"include": str(LM_EVAL_GSM8K), "dataset_path": "json", "dataset_name": None},
        "gsm8k_fewshot_copy": {"include": str(SHIPPED), "repeats": 8,
                               "filter_list": yaml.safe_load(SHIPPED.read_text())["filter_list"][:2]},
    }  # fmt: skip
    for name, config in copies.items():
        config.update(task=name, tag=[], dataset_kwargs={"data_files": files})
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder, test


def lm_eval_run(folder: Path, task: str, questions: list[str], completions: list[list[str]]) -> tuple[dict, ScriptedLM]:
    """lm-eval's own evaluation of `task` with the scripted completions: {filter: [per-doc sample logs]}."""
    model = ScriptedLM(questions, completions)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = lm_eval.simple_evaluate(model=model, tasks=[task], log_samples=True, task_manager=manager)
    by_filter: dict[str, list[dict]] = {}
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        by_filter.setdefault(sample["filter"], []).append(sample)
    return by_filter, model


def our_source(folder: Path, task: str, tokenizer, **spec) -> ReasoningDataModule:
    data = ReasoningDataModule(task="lm_eval", lm_eval=LmEvalSpec(task=task, include_path=str(folder), **spec),
                               tokenizer=tokenizer, max_length=4096)  # fmt: skip
    data.setup("test")
    return data


@pytest.mark.parametrize("task", ["gsm8k_copy", "gsm8k_fewshot_copy"])
def test_prompts_stops_and_scores_equal_lm_evals_own_run(task, task_copies, tiny_tokenizer):
    folder, docs = task_copies
    questions = [doc["question"] for doc in docs]
    completions = [[text] for text in SINGLE] if task == "gsm8k_copy" else REPEATED
    by_filter, model = lm_eval_run(folder, task, questions, [list(c) for c in completions])
    data = our_source(folder, task, tiny_tokenizer)
    examples = data.test_examples
    assert [e.id for e in examples] == [f"test-{i}" for i in range(8)]
    for example, question in zip(examples, questions, strict=True):
        context, gen_kwargs = model.requests[question]
        assert example.prompt == context and example.prompt.endswith(question + ("\nAnswer:" if task == "gsm8k_copy"
                                                                                else "\n Answer: "))  # fmt: skip
        assert data.scorer.stop == gen_kwargs["until"]
    assert data.scorer.max_new_tokens == (256 if task == "gsm8k_copy" else 200)  # lm-eval's default; the task's
    prompt_ids = [row["prompt_ids"] for row in data.splits["test"]]
    assert prompt_ids == [tiny_tokenizer(example.prompt).input_ids for example in examples]  # as lm-eval's HF model
    for index, (example, samples) in enumerate(zip(examples, completions, strict=True)):
        predictions, correct, per_filter = data.scorer.score(example.id, samples)
        assert per_filter.keys() == by_filter.keys()
        for name, logs in by_filter.items():
            assert per_filter[name] == {"exact_match": logs[index]["exact_match"]}, (name, samples)
        first = next(iter(by_filter.values()))[index]
        assert predictions[0] == first["filtered_resps"][0] and correct[0] == (first["exact_match"] == 1.0)
    if task == "gsm8k_fewshot_copy":
        return
    upstream = our_source(folder, "gsm8k_fewshot_copy", tiny_tokenizer).scorer
    scores = [upstream.score(f"test-{i}", [text])[2]["score-first"]["exact_match"] for i, text in enumerate(SINGLE)]
    assert scores == UPSTREAM_CORRECT
    strict = [data.scorer.score(f"test-{i}", [text])[2]["strict-match"]["exact_match"] for i, text in enumerate(SINGLE)]
    assert strict == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # lm-eval's gsm8k reads "#### N" only


def test_unparsable_samples_vote_for_invalid_in_maj_at_k(task_copies, tiny_tokenizer):
    folder, docs = task_copies
    by_filter, _ = lm_eval_run(folder, "gsm8k_fewshot_copy", [d["question"] for d in docs], REPEATED)
    scorer = our_source(folder, "gsm8k_fewshot_copy", tiny_tokenizer).scorer
    ours = []
    for index, samples in enumerate(REPEATED):
        predictions, correct, _ = scorer.score(f"test-{index}", samples)
        assert predictions.count("[invalid]") == samples.count(INVALID)
        ours.append(question_metrics(predictions, correct, [8])["maj@8"])
    assert ours == [log["exact_match"] for log in by_filter["maj@8"]] == [0, 1, 0, 1, 0, 1, 0, 0]
    # the old scorer let only parsable samples vote: question 0 would have been right (3 votes for 18, none else)
    assert score_completion("gsm8k", INVALID, "18") == (None, False)


def test_a_missing_dataset_or_task_is_one_line(tmp_path, tiny_tokenizer):
    missing = tmp_path / "nowhere/test.jsonl"
    config = {"include": str(SHIPPED), "task": "broken_copy", "tag": [],
              "dataset_kwargs": {"data_files": {"test": str(missing)}}}  # fmt: skip
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserInputError) as error:
        our_source(tmp_path, "broken_copy", tiny_tokenizer)
    assert "broken_copy" in str(error.value) and "\n" not in str(error.value)
    assert str(missing) in str(error.value) or "nowhere" in str(error.value)
    with pytest.raises(UserInputError, match="no task 'no_such_task'"):
        our_source(tmp_path, "no_such_task", tiny_tokenizer)
    with pytest.raises(UserInputError, match="data.prompt does not apply"):
        ReasoningDataModule(task="lm_eval", prompt=PromptSpec(style="plain"))
