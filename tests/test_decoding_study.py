"""Repeated sampling (maj@k, pass@k), rank logs, top-k traces and calibration, on tiny models and end to end."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, read_jsonl, run_main, synthetic_traces
from scipy.stats import binomtest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import build_cli
from commands.calibrate import calibrate
from evaluation.decoding import DecodingSpec
from evaluation.generation import GenerationSpec, generate
from evaluation.rank_log import RankLogSpec, RankRecorder
from evaluation.sampling_metrics import majority_vote, pass_at_k, question_metrics
from tasks.examples import TASKS, load_examples
from tasks.prompts import PromptFormatter, PromptSpec

STUDY = REPO / "configs/decoding_gsm8k.yaml"
STRATEGIES = sorted((REPO / "configs/decoding").glob("*.yaml"))


# ------------------------------------------------------------------------------------------- maj@k / pass@k
def pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(8, 3, 1), (8, 3, 2), (8, 3, 6), (12, 5, 6), (4, 0, 2), (6, 5, 3), (10, 1, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_enumeration(n, c, k))
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8) and pass_at_k(8, 7, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_over_the_first_k_samples():
    predictions = ["3", None, "5", "5", "3", "3"]
    correct = [True, False, False, False, True, True]
    assert majority_vote(predictions, correct) == ("3", True)
    assert majority_vote(predictions[:4], correct[:4]) == ("5", False)
    assert majority_vote(["5", "3"], [False, True]) == ("5", False)  # a tie goes to the first answer seen
    assert majority_vote([None, None], [False, False]) == (None, False)
    metrics = question_metrics(predictions, correct, [1, 4, 6, 8])
    pass_4 = pass_at_k_by_enumeration(6, 3, 4)
    assert metrics == {"maj@1": 1.0, "pass@1": 0.5, "maj@4": 0.0, "pass@4": pytest.approx(pass_4),
                       "maj@6": 1.0, "pass@6": 1.0}  # fmt: skip


def test_repeats_need_sampling():
    from core.errors import UserInputError

    with pytest.raises(UserInputError, match="repeats > 1 needs sampling"):
        GenerationSpec(repeats=4)
    with pytest.raises(UserInputError, match="repeats must be"):
        GenerationSpec(repeats=0, decoding=DecodingSpec(temperature=1.0))


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.name)
def test_every_decoding_config_stacks_on_the_study(strategy, tiny_llama, tmp_path):
    cli = build_cli(["--config", str(STUDY), "--config", str(strategy), "--model.init_args.backbone.name",
                     str(tiny_llama), "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)  # fmt: skip
    wanted = yaml.safe_load(strategy.read_text())["model"]["init_args"]["generation"]
    generation = cli.model.generation
    for name, value in wanted["decoding"].items():
        assert getattr(generation.decoding, name) == value
    assert generation.repeats == wanted.get("repeats", 32)
    assert cli.datamodule.lm_eval.task == "gsm8k_fewshot"  # upstream's lm-eval task renders and scores


# ------------------------------------------------------------------------------------------------- rank logs
def prompts(tokenizer, count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    formatter = PromptFormatter(tokenizer, PromptSpec(style="plain"))
    examples = load_examples(TASKS["gsm8k"], None, "test")[:count]
    ids = [formatter.encode_prompt(example.question) for example in examples]
    width = max(map(len, ids))
    padded = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    return padded, mask


def test_rank_logs_are_rank_one_everywhere_under_greedy_decoding(tiny_llama):
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
        AutoTokenizer.from_pretrained(tiny_llama),
    )
    recorder = RankRecorder(RankLogSpec(low_confidence=1.0, low_probability=1.0))  # every step is logged
    spec = GenerationSpec(max_new_tokens=12)
    completions = generate(model, tokenizer, *prompts(tokenizer), spec, rank_recorder=recorder)
    assert len(recorder.low_confidence) == len(completions) == 3
    for ranks in recorder.low_confidence + recorder.low_probability:
        assert ranks and set(ranks) == {1} and len(ranks) <= 12


def test_repeats_share_one_prefill_and_decode_like_separate_prompts(tiny_llama):
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
        AutoTokenizer.from_pretrained(tiny_llama),
    )
    ids, mask = prompts(tokenizer)
    greedy = generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=10))
    top1 = GenerationSpec(max_new_tokens=10, repeats=3, decoding=DecodingSpec(temperature=1.0, top_k=1))
    assert generate(model, tokenizer, ids, mask, top1) == [text for text in greedy for _ in range(3)]


def test_rank_logs_of_sampled_tokens_respect_top_k(tiny_llama):
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
        AutoTokenizer.from_pretrained(tiny_llama),
    )
    recorder = RankRecorder(RankLogSpec(low_confidence=1.0, low_probability=1.0))
    spec = GenerationSpec(max_new_tokens=16, repeats=4, decoding=DecodingSpec(temperature=5.0, top_k=3))
    torch.manual_seed(0)
    completions = generate(model, tokenizer, *prompts(tokenizer), spec, rank_recorder=recorder)
    assert len(completions) == len(recorder.low_confidence) == 12  # 3 questions x 4 samples
    ranks = [rank for row in recorder.low_confidence for rank in row]
    assert set(ranks) <= {1, 2, 3} and {2, 3} & set(ranks)  # the raw model's ranks of top-3 samples
    strict = RankRecorder(RankLogSpec(low_confidence=1e-9, low_probability=1e-9))
    generate(model, tokenizer, *prompts(tokenizer), spec, rank_recorder=strict)
    assert strict.low_confidence == [[]] * 12  # no step has a top-1 probability below 1e-9


# ------------------------------------------------------------------------------------ repeats through the CLI
def study_args(model: Path, save_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(STUDY), "--model.init_args.backbone.name", str(model),
        "--data.test_limit", "3", "--data.eval_batch_size", "2", "--data.max_length", "2048",
        "--data.lm_eval.max_gen_toks", "6", "--model.init_args.generation.repeats", "4",
        "--model.init_args.generation.at_k", "[1, 2, 4]",
        "--model.init_args.rank_log.low_confidence", "1.0",
        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_repeats_report_maj_and_pass_at_k_with_aligned_rank_logs(tiny_llama, tmp_path):
    assert run_main(["test", *study_args(tiny_llama, tmp_path)]) == 0
    samples = tmp_path / "decoding_gsm8k/version_0/samples"
    rows = read_jsonl(samples / "test_step0.jsonl")
    assert len(rows) == 3 and all(len(row["completions"]) == len(row["predictions"]) == 4 for row in rows)
    for row in rows:
        assert row["metrics"] == question_metrics(row["predictions"], row["samples_correct"], [1, 2, 4])
        assert (row["prediction"], row["correct"]) == majority_vote(row["predictions"], row["samples_correct"])
    summary = json.loads((samples / "test_step0_summary.json").read_text())
    assert summary["samples_per_question"] == 4 and summary["questions"] == 3
    for name in ("maj@1", "maj@2", "maj@4", "pass@1", "pass@2", "pass@4"):
        assert summary[name] == pytest.approx(sum(row["metrics"][name] for row in rows) / 3)
    first = sum(row["lm_eval"]["score-first"]["exact_match"] for row in rows) / 3  # the task's own filter and metric
    assert summary["lm_eval/score-first/exact_match"] == pytest.approx(first)
    assert first == pytest.approx(sum(row["samples_correct"][0] for row in rows) / 3)
    assert summary["accuracy"] == pytest.approx(sum(row["correct"] for row in rows) / 3)
    wilson = binomtest(sum(row["correct"] for row in rows), 3).proportion_ci(method="wilson")
    assert summary["accuracy_ci95"] == pytest.approx([wilson.low, wilson.high])
    for name in ("maj@1", "maj@2", "maj@4", "pass@1", "pass@2", "pass@4"):
        assert summary[f"{name}_ci95"][0] <= summary[name] <= summary[f"{name}_ci95"][1]
    per_sample = [sum(row["samples_correct"][j] for row in rows) / 3 for j in range(4)]
    assert summary["single_sample_accuracy"]["per_sample"] == pytest.approx(per_sample)
    assert summary["single_sample_accuracy"]["mean"] == pytest.approx(summary["pass@1"])
    events = EventAccumulator(str(samples.parent), size_guidance={"tensors": 0}).Reload()
    assert "test/summary/text_summary" in events.Tags()["tensors"]  # the summary table as TensorBoard text
    ranks = read_jsonl(samples / "test_step0_ranks.jsonl")  # one line per sequence, in the samples' order
    assert [(line["id"], line["sample"]) for line in ranks] == [(row["id"], s) for row in rows for s in range(4)]
    assert all(1 <= len(line["low_confidence_ranks"]) <= 6 for line in ranks)  # every step logged (threshold 1)
    out = tmp_path / "analysis"
    args = ["--samples", str(samples / "test_step0.jsonl"), "--ranks", str(samples / "test_step0_ranks.jsonl")]
    assert run_main(["analyze", *args, "--output_dir", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["overall"]["sequences"] == 12
    assert analysis["overall"]["accuracy"] == pytest.approx(summary["pass@1"])
    assert analysis["majority_vote"]["all samples"]["accuracy"] == pytest.approx(summary["accuracy"])


@pytest.mark.slow
def test_predict_with_repeats_writes_one_row_per_question(tiny_llama, tmp_path):
    assert run_main(["predict", *study_args(tiny_llama, tmp_path)]) == 0
    run = tmp_path / "decoding_gsm8k/version_0"
    rows = read_jsonl(run / "predictions.jsonl")
    assert len(rows) == 3 and len({row["id"] for row in rows}) == 3
    assert all({"id", "question", "answer"} <= row.keys() and len(row["completions"]) == 4 for row in rows)
    assert all(isinstance(text, str) for row in rows for text in row["completions"]) and "ranks" not in rows[0]
    assert len(read_jsonl(run / "rank_logs.jsonl")) == 12


# ------------------------------------------------------------------------------------------------- traces
def test_traces_match_a_direct_computation(tiny_llama, tmp_path):
    output = tmp_path / "traces.jsonl.gz"
    args = ["traces", "--output", str(output), "--model.name", str(tiny_llama), "--limit", "3", "--k", "5",
            "--batch_size", "2", "--chunk_tokens", "7", "--prompt.style", "plain"]  # fmt: skip
    assert run_main(args) == 0
    lines = read_jsonl(output)
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
        AutoTokenizer.from_pretrained(tiny_llama),
    )
    formatter = PromptFormatter(tokenizer, PromptSpec(style="plain"))
    examples = load_examples(TASKS["gsm8k"], None, "train")
    import random

    chosen = [examples[i] for i in sorted(random.Random(0).sample(range(len(examples)), 3))]
    expected = []
    for example in chosen:  # each example alone, unpadded, through the whole model
        ids, labels = formatter.encode_example(example.question, example.response)
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0].float().softmax(-1)
        for position in range(1, len(ids)):
            if labels[position] != -100:
                top = probs[position - 1].topk(5)
                expected.append((ids[position], top.indices.tolist(), top.values.tolist()))
    assert len(lines) == len(expected)
    for line, (gt, top_ids, top_probs) in zip(lines, expected, strict=True):
        assert line["gt"] == gt and line["top_ids"] == top_ids
        assert all(isinstance(p, str) and len(p.split(".")[1]) == 8 for p in line["top_probs"])
        np.testing.assert_allclose([float(p) for p in line["top_probs"]], top_probs, atol=2e-6)
    assert run_main(["traces", "--output", str(output), "--model.name", str(tiny_llama), "--k", "0"]) == 2


# -------------------------------------------------------------------------------------------- calibration
def test_calibration_recovers_a_known_power_law(tmp_path):
    traces = tmp_path / "traces.jsonl"
    expected = synthetic_traces(traces, a=-0.3, b=1.2)
    summary = calibrate(str(traces), str(tmp_path / "out"), ranks=4, threshold=0.1)
    np.testing.assert_allclose(summary["acc"], expected["acc"], atol=1e-12)
    np.testing.assert_allclose(summary["mu_uncond"], expected["mu"], atol=1e-8)
    np.testing.assert_allclose(np.array(summary["mu_cond"], dtype=float), expected["mu"], atol=1e-8)
    assert summary["fit"]["A"] == pytest.approx(-0.3, abs=5e-3) and summary["fit"]["B"] == pytest.approx(1.2, abs=5e-3)
    wanted = [max([r + 1 for r in range(4) if expected["acc"][b, r] > 0.1], default=1) for b in range(9, -1, -1)]
    assert summary["dynamic_top_k"] == wanted and wanted[0] > 1
    out = tmp_path / "out"
    assert (out / "calibration_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    topk = yaml.safe_load((out / "calibrated_topk.yaml").read_text())["model"]["init_args"]["generation"]["decoding"]
    eps = yaml.safe_load((out / "calibrated_eps.yaml").read_text())["model"]["init_args"]["generation"]["decoding"]
    assert topk["dynamic_top_k"] == wanted and eps["cal_acc"][2] == 0.1
    assert DecodingSpec(**eps).cal_acc[1] == pytest.approx(1.2, abs=5e-3)


def test_calibrate_config_and_bad_input_through_the_cli(tiny_llama, tmp_path, capsys):
    traces = tmp_path / "traces.jsonl"
    synthetic_traces(traces, a=-0.3, b=1.0, per_bin=200)
    out = tmp_path / "out"
    args = ["calibrate", "--config", str(REPO / "configs/calibrate.yaml"), "--output_dir", str(out)]
    assert run_main([*args, "--traces", str(traces), "--ranks", "4"]) == 0
    assert json.loads((out / "calibration.json").read_text())["threshold"] == 0.05  # from configs/calibrate.yaml
    assert run_main([*args, "--traces", str(traces)]) == 2  # ranks 20 > the traces' 4
    assert f"{traces}:1:" in capsys.readouterr().err
    traces.write_text(traces.read_text() + "{not json\n")
    assert run_main([*args, "--traces", str(traces), "--ranks", "4"]) == 2
    assert f"{traces}:2001:" in capsys.readouterr().err
    assert run_main([*args, "--traces", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- analyze
def test_analysis_merges_by_id_and_sample_not_by_position(tmp_path, capsys):
    rows = [  # question a: 3 samples, question b: 3 samples
        {"id": "a", "predictions": ["1", "2", "1"], "samples_correct": [True, False, True]},
        {"id": "b", "predictions": ["5", "6", "6"], "samples_correct": [True, False, False]},
    ]
    ranks = {("a", 0): [1, 1], ("a", 1): [4], ("a", 2): [], ("b", 0): [1], ("b", 1): [12, 2], ("b", 2): [3]}
    lines = [
        {"id": i, "sample": s, "low_confidence_ranks": r, "low_probability_ranks": []} for (i, s), r in ranks.items()
    ]
    samples_path, ranks_path = tmp_path / "samples.jsonl", tmp_path / "ranks.jsonl"
    samples_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ranks_path.write_text("".join(json.dumps(line) + "\n" for line in reversed(lines)))  # another order
    result = run_main(["analyze", "--samples", str(samples_path), "--ranks", str(ranks_path),
                       "--output_dir", str(tmp_path / "out"), "--vote_thresholds", "[1, 3]", "--vote_filter", "max",
                       "--vote_fallback", "true", "--rank_counting", "sequences"])  # fmt: skip
    assert result == 0
    analysis = json.loads((tmp_path / "out/analysis.json").read_text())
    assert analysis["overall"] == {"sequences": 6, "accuracy": 0.5}
    steps = analysis["by_number_of_logged_steps"]
    assert steps["0"] == {"sequences": 1, "accuracy": 1.0} and steps["1"] == {"sequences": 3, "accuracy": 1 / 3}
    assert steps["2"] == {"sequences": 2, "accuracy": 0.5}
    by_rank = analysis["by_sampled_rank"]
    assert by_rank["1"] == {"sequences": 2, "accuracy": 1.0} and by_rank["4"] == {"sequences": 1, "accuracy": 0.0}
    assert by_rank["10+"] == {"sequences": 1, "accuracy": 0.0} and by_rank["2"]["sequences"] == 1
    single = analysis["single_step_by_rank"]
    assert single["1"] == {"sequences": 1, "accuracy": 1.0} and single["3"] == {"sequences": 1, "accuracy": 0.0}
    assert analysis["by_mean_rank"]["1"] == {"sequences": 2, "accuracy": 1.0}
    assert analysis["by_mean_rank"]["(5, 10]"] == {"sequences": 1, "accuracy": 0.0}  # mean of [12, 2] = 7
    assert analysis["by_max_rank"][">10"] == {"sequences": 1, "accuracy": 0.0}
    votes = analysis["majority_vote"]
    assert votes["all samples"]["accuracy"] == 0.5  # a: "1" wins (right); b: "6" wins (wrong)
    assert votes["max rank <= 1"] == {"accuracy": 1.0, "questions": 2, "coverage": 1.0}  # a: 0, 2; b: 0 only
    for name in ("accuracy_vs_logged_steps.png", "accuracy_per_sampled_rank.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert "by sampled rank" in capsys.readouterr().out

    ranks_path.write_text(ranks_path.read_text() + json.dumps({"id": "zz", "sample": 0, "low_confidence_ranks": []}))
    assert run_main(["analyze", "--samples", str(samples_path), "--ranks", str(ranks_path), "--output_dir", "x"]) == 2
    assert f"{ranks_path}:7: id 'zz'" in capsys.readouterr().err


def test_analysis_defaults_are_the_reference_semantics(tmp_path):
    """merge_low_conf_ranks_seq.py: per-rank accuracy counts every logged occurrence; the conditioned majority vote
    keeps samples whose mean logged rank is <= T (none logged: left out) and leaves out questions without one."""
    rows = [
        {"id": "a", "predictions": ["1", "2", "1"], "samples_correct": [True, False, True]},
        {"id": "b", "predictions": ["5", "6", "6"], "samples_correct": [True, False, False]},
        {"id": "c", "predictions": ["7", "8", "8"], "samples_correct": [True, False, False]},
    ]
    ranks = {("a", 0): [1, 1], ("a", 1): [4], ("a", 2): [], ("b", 0): [1], ("b", 1): [12, 2], ("b", 2): [3],
             ("c", 0): [5, 5], ("c", 1): [2, 2], ("c", 2): [6]}  # fmt: skip
    lines = [{"id": i, "sample": s, "low_confidence_ranks": r} for (i, s), r in ranks.items()]
    samples_path, ranks_path = tmp_path / "samples.jsonl", tmp_path / "ranks.jsonl"
    samples_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ranks_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["analyze", "--samples", str(samples_path), "--ranks", str(ranks_path), "--output_dir", str(tmp_path / "o")]
    assert run_main(args) == 0
    analysis = json.loads((tmp_path / "o/analysis.json").read_text())
    by_rank = analysis["by_sampled_rank"]
    # rank 1: a0 twice (right) and b0 once (right); rank 2: b1 (wrong) and c1 twice (wrong); rank 5: c0 twice (right)
    assert by_rank["1"] == {"occurrences": 3, "accuracy": 1.0} and by_rank["2"] == {"occurrences": 3, "accuracy": 0.0}
    assert by_rank["5"] == {"occurrences": 2, "accuracy": 1.0} and by_rank["10+"] == {"occurrences": 1, "accuracy": 0.0}
    votes = analysis["majority_vote"]
    # mean <= 2: a keeps a0 ("1", right), b keeps b0 ("5", right), c keeps c1 ("8", wrong): 2 of 3
    assert votes["mean rank <= 2"] == {"accuracy": 2 / 3, "questions": 3, "coverage": 1.0}
    # mean <= 1: a keeps a0, b keeps b0, c keeps nothing and is left out: 2 of 2
    assert run_main([*args, "--vote_thresholds", "[1]"]) == 0
    votes = json.loads((tmp_path / "o/analysis.json").read_text())["majority_vote"]
    assert votes["mean rank <= 1"] == {"accuracy": 1.0, "questions": 2, "coverage": 2 / 3}
    # with our fallback c votes over all its samples ("8" wins: wrong): 2 of 3
    assert run_main([*args, "--vote_thresholds", "[1]", "--vote_fallback", "true"]) == 0
    votes = json.loads((tmp_path / "o/analysis.json").read_text())["majority_vote"]
    assert votes["mean rank <= 1"] == {"accuracy": 2 / 3, "questions": 3, "coverage": 2 / 3}


# ------------------------------------------------------------------------------------- embedded model, end to end
@pytest.mark.slow
def test_decoding_study_traces_and_calibration_on_the_embedded_model(tmp_path):
    """The few-shot study with 4 samples per question on 2 questions, then traces -> grid -> a decoding config."""
    args = ["test", "--config", str(STUDY), "--data.test_limit", "2", "--data.eval_batch_size", "2",
            "--data.lm_eval.max_gen_toks", "32", "--model.init_args.generation.repeats", "4",
            "--model.init_args.generation.at_k", "[1, 4]", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert run_main(args) == 0
    samples = tmp_path / "decoding_gsm8k/version_0/samples"
    rows = read_jsonl(samples / "test_step0.jsonl")
    assert len(rows) == 2 and all(len(row["completions"]) == 4 for row in rows)
    # the few-shot format is followed: some of the 8 samples reach "The answer is" within 32 tokens (2 here)
    assert sum(p != "[invalid]" for row in rows for p in row["predictions"]) >= 1
    summary = json.loads((samples / "test_step0_summary.json").read_text())
    assert {"maj@1", "maj@4", "pass@1", "pass@4"} <= summary.keys() and summary["pass@4"] >= summary["pass@1"]
    assert len(read_jsonl(samples / "test_step0_ranks.jsonl")) == 8

    traces = tmp_path / "traces.jsonl"
    assert run_main(["traces", "--output", str(traces), "--limit", "3", "--k", "10", "--batch_size", "3"]) == 0
    lines = read_jsonl(traces)
    assert len(lines) > 100 and all(len(line["top_ids"]) == 10 for line in lines)
    hit_rate = sum(line["gt"] == line["top_ids"][0] for line in lines) / len(lines)
    assert hit_rate > 0.5  # a real model predicts most gold tokens of GSM8K solutions
    out = tmp_path / "calibration"
    assert run_main(["calibrate", "--config", str(REPO / "configs/calibrate.yaml"), "--traces", str(traces),
                     "--output_dir", str(out), "--ranks", "10", "--min_samples", "1"]) == 0  # fmt: skip
    grid = json.loads((out / "calibration.json").read_text())
    assert sum(grid["counts"]) == len(lines) and grid["acc"][9][0] > grid["acc"][0][0]  # confident bins are right
    cli = build_cli(["--config", str(STUDY), "--config", str(out / "calibrated_topk.yaml"),
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.model.generation.decoding.dynamic_top_k == grid["dynamic_top_k"]


def test_gsm8k_scoring_reads_the_few_shot_answer_sentence():
    from tasks.scoring import score_completion

    completion = "She sold 48/2 = 24 in May, so 48 + 24 = 72 in all. The answer is 72."
    assert score_completion("gsm8k", completion, "72") == ("72", True)
    assert score_completion("gsm8k", "It costs $1,250 in total. The answer is $1,250.", "1250") == ("1250", True)
    assert score_completion("gsm8k", "3 + 4 = 7 and 7 * 2 = 14. The answer is 15.", "14") == ("15", False)


def test_rank_logs_end_at_a_stop_string_when_the_tokenizer_pads_with_its_eos(tmp_path):
    """A row stopped by a stop string is padded (here with the EOS) while the others go on: its log ends at the stop
    string's last token, as vLLM's does, and holds no step for the padding."""
    from helpers import save_tiny

    folder = save_tiny(tmp_path / "gemma2", "gemma2")  # its greedy rows are not one repeated token
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    ids, mask = prompts(tokenizer)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    tokens = free[0, ids.shape[1] :].tolist()
    change = next(k for k, token in enumerate(tokens) if token != tokens[0])
    stop = tokenizer.decode(tokens[change : change + 1])
    stop_length = next(n for n in range(1, 13) if stop in tokenizer.decode(tokens[:n]))  # by brute force
    others = [tokenizer.decode(row[ids.shape[1] :]) for row in free[1:]]
    assert 1 < stop_length < 12 and all(stop not in text for text in others)  # the other rows run 12 steps
    recorder = RankRecorder(RankLogSpec(low_confidence=1.0, low_probability=1.0))
    generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=12, stop=[stop]), rank_recorder=recorder)
    assert recorder.low_confidence[0] == recorder.low_probability[0] == [1] * stop_length
    assert [len(ranks) for ranks in recorder.low_confidence[1:]] == [12, 12]
