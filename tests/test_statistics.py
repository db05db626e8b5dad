"""Intervals, paired tests and the summaries / `compare` tables built on them, against independent computations."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from helpers import run_main, write_jsonl
from scipy.stats import binomtest

from evaluation.sampling_metrics import majority_vote, question_metrics
from evaluation.statistics import (
    BETTER,
    NOISE,
    WORSE,
    bootstrap_interval,
    mcnemar_exact,
    paired_comparison,
    sample_spread,
    wilson_interval,
)
from evaluation.summaries import arms_summary, arms_table, evaluation_summary, summary_table


# ---------------------------------------------------------------------------------------------- intervals
@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (5, 10), (10, 10), (1, 30), (17, 30), (412, 1319)])
def test_wilson_interval_matches_scipy(successes, n):
    expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_wilson_interval_by_hand():
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # p = 0: upper bound z^2 / (n + z^2)
    low, high = wilson_interval(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(2 * 0.5 * np.sqrt(z2 / (10 + z2)))
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_mcnemar_matches_scipy_and_enumeration():
    for fixed, broken in itertools.product(range(9), repeat=2):
        p_value = mcnemar_exact(fixed, broken)
        if fixed + broken:
            assert p_value == pytest.approx(binomtest(fixed, fixed + broken, 0.5).pvalue, abs=1e-12)
        # every way the fixed + broken discordant questions could have split, each with probability 1/2^m:
        # the share at least as unbalanced as the one observed
        m = fixed + broken
        extreme = sum(abs(2 * sum(flips) - m) >= abs(fixed - broken) for flips in itertools.product((0, 1), repeat=m))
        assert p_value == pytest.approx(extreme / 2**m, abs=1e-12)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 0) == pytest.approx(2 / 32)


def test_bootstrap_degenerate_cases_by_hand():
    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5)  # every resample has the same mean
    assert bootstrap_interval([1.0]) == (1.0, 1.0)
    # two questions 0 and 1: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_contains_the_mean_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 160, 640):
        values = (rng.random(n) < 0.3).astype(float)
        low, high = bootstrap_interval(values)
        assert low < values.mean() < high
        widths.append(high - low)
        normal = 2 * 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / n)  # the normal approximation
        assert high - low == pytest.approx(normal, rel=0.15)
        assert bootstrap_interval(values) == (low, high)  # same seed, same interval
    assert widths[0] > widths[1] > widths[2]


# -------------------------------------------------------------------------------------- paired comparisons
def test_paired_comparison_by_hand():
    reference = [1, 1, 0, 0, 1, 0]
    other = [1, 0, 1, 1, 1, 0]  # fixes questions 2 and 3, breaks question 1
    result = paired_comparison(reference, other)
    assert result["difference"] == pytest.approx(1 / 6) and (result["fixed"], result["broken"]) == (2, 1)
    assert result["mcnemar_p"] == pytest.approx(1.0) and result["verdict"] == NOISE
    low, high = result["difference_ci95"]
    assert low < 0 < high

    reference, other = [0] * 20 + [1] * 20, [1] * 40  # 20 fixed, none broken
    result = paired_comparison(reference, other)
    assert result["mcnemar_p"] == pytest.approx(2 / 2**20) and result["verdict"] == BETTER
    assert result["difference"] == 0.5 and result["difference_ci95"][0] > 0
    assert paired_comparison(other, reference)["verdict"] == WORSE

    fractional = paired_comparison([0.25, 0.5, 0.75], [0.5, 0.5, 1.0])  # pass@k values: no McNemar
    assert "mcnemar_p" not in fractional and fractional["difference"] == pytest.approx(1 / 6)


def test_sample_spread_by_hand():
    table = [[True, False, True, True], [False, False, True, False], [True, True, True, False]]
    spread = sample_spread(table)
    per_sample = [2 / 3, 1 / 3, 1.0, 1 / 3]  # each column's share of correct answers
    assert spread["per_sample"] == pytest.approx(per_sample)
    assert spread["mean"] == pytest.approx(statistics.mean(per_sample))
    assert spread["std"] == pytest.approx(statistics.stdev(per_sample))
    assert (spread["min"], spread["max"]) == pytest.approx((1 / 3, 1.0))


# ------------------------------------------------------------------------------------------------ summaries
def repeat_rows(n_questions: int, n_samples: int, seed: int = 0) -> list[dict]:
    rng, rows = np.random.default_rng(seed), []
    for index in range(n_questions):
        correct = [bool(c) for c in rng.random(n_samples) < 0.4]
        predictions = ["7" if c else str(rng.integers(1, 4)) for c in correct]
        row = {"id": f"q{index}", "predictions": predictions, "samples_correct": correct}
        row["prediction"], row["correct"] = majority_vote(predictions, correct)
        row["metrics"] = question_metrics(predictions, correct, [1, 2, 4])
        rows.append(row)
    return rows


def test_evaluation_summary_with_repeats_has_intervals_and_the_spread():
    rows = repeat_rows(30, 4)
    summary = evaluation_summary(rows)
    majority = sum(row["correct"] for row in rows)
    expected = binomtest(majority, 30).proportion_ci(method="wilson")
    assert summary["accuracy"] == pytest.approx(majority / 30)
    assert summary["accuracy_ci95"] == pytest.approx([expected.low, expected.high])
    for name in ("maj@1", "maj@2", "maj@4", "pass@1", "pass@2", "pass@4"):
        assert summary[name] == pytest.approx(np.mean([row["metrics"][name] for row in rows]))
        assert summary[f"{name}_ci95"] == pytest.approx(list(bootstrap_interval([r["metrics"][name] for r in rows])))
        assert summary[f"{name}_ci95"][0] <= summary[name] <= summary[f"{name}_ci95"][1]
    spread = summary["single_sample_accuracy"]
    assert spread["mean"] == pytest.approx(summary["pass@1"])  # pass@1 is the mean single-sample accuracy
    assert spread["per_sample"] == pytest.approx([np.mean([r["samples_correct"][j] for r in rows]) for j in range(4)])
    table = summary_table(summary)
    assert "pass@4" in table and f"{summary['accuracy_ci95'][0]:.4f}" in table and "std" in table

    greedy = evaluation_summary([{"id": "a", "correct": True}, {"id": "b", "correct": False}])
    assert set(greedy) == {"questions", "accuracy", "accuracy_ci95", "intervals"}


def test_arms_summary_reports_the_paired_test_against_the_baseline():
    baseline = [True, True, False, False, False, True, False, False]
    slot = [True, False, True, True, True, True, False, True]  # fixes q2 q3 q4 q7, breaks q1
    by_arm = {
        arm: [{"id": f"q{i}", "correct": c, "format_ok": i % 2 == 0, "slot_loss": [2.0, i]} for i, c in enumerate(v)]
        for arm, v in (("base", baseline), ("slot", slot))
    }
    summary = arms_summary(by_arm)
    entry = summary["arms"]["slot"]
    assert entry["fixed"] == ["q2", "q3", "q4", "q7"] and entry["broken"] == ["q1"]
    paired = entry["vs_baseline"]
    assert paired["difference"] == pytest.approx(3 / 8) and (paired["fixed"], paired["broken"]) == (4, 1)
    assert paired["mcnemar_p"] == pytest.approx(binomtest(4, 5).pvalue) and paired["verdict"] == NOISE
    wilson = binomtest(6, 8).proportion_ci(method="wilson")
    assert entry["accuracy_ci95"] == pytest.approx([wilson.low, wilson.high])
    assert entry["format_accuracy"] == 0.5 and entry["mean_final_loss"] == pytest.approx(3.5)
    assert "vs_baseline" not in summary["arms"]["base"] and summary["baseline"] == "base"
    assert NOISE in arms_table(summary) and "(baseline)" in arms_table(summary)


# ------------------------------------------------------------------------------------------------- compare
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Run A right on q0..q3 of 10 questions; run B fixes q4 q5 q6, breaks q0 (listed in another order)."""
    a = [{"id": f"q{i}", "correct": i < 4} for i in range(10)]
    b = [{"id": f"q{i}", "correct": 1 <= i < 7} for i in reversed(range(10))]
    write_jsonl(tmp_path / "a/samples/test_step0.jsonl", a)
    write_jsonl(tmp_path / "a/samples/test_step0_ranks.jsonl", [{"id": "q0", "sample": 0}])  # not a samples file
    write_jsonl(tmp_path / "b/samples/test_step5.jsonl", b)
    return tmp_path / "a", tmp_path / "b"


def test_compare_two_runs_with_known_flips(tmp_path, capsys):
    run_a, run_b = two_runs(tmp_path)
    out = tmp_path / "out"
    assert run_main(["compare", str(run_a), str(run_b), "--output_dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(row["metric"], row["input"]) for row in rows] == [("accuracy", str(run_a)), ("accuracy", str(run_b))]
    ref, other = rows
    assert float(ref["value"]) == 0.4 and float(other["value"]) == 0.6 and other["questions"] == "10"
    assert ref["difference"] == "" and float(other["difference"]) == pytest.approx(0.2)
    assert (other["fixed"], other["broken"]) == ("3", "1")
    assert float(other["mcnemar_p"]) == pytest.approx(0.625)  # 2 * (1 + 4) / 16
    assert other["verdict"] == NOISE
    wilson = binomtest(6, 10).proportion_ci(method="wilson")
    assert (float(other["ci95_low"]), float(other["ci95_high"])) == pytest.approx((wilson.low, wilson.high))
    assert float(other["difference_ci95_low"]) < 0 < float(other["difference_ci95_high"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "compare.md").read_text()
    assert "+0.2000 [" in markdown and NOISE in markdown and "test_step5.jsonl" in markdown
    assert "| accuracy |" in capsys.readouterr().out

    assert run_main(["compare", str(run_a), str(run_b), "--output_dir", str(out), "--reference", "b"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert rows[0]["input"] == str(run_a) and float(rows[0]["difference"]) == pytest.approx(-0.2)
    assert (rows[0]["fixed"], rows[0]["broken"]) == ("1", "3")


def test_compare_refuses_different_question_sets_unless_asked(tmp_path, capsys):
    run_a, run_b = two_runs(tmp_path)
    samples = run_b / "samples/test_step5.jsonl"
    write_jsonl(samples, [json.loads(line) for line in samples.read_text().splitlines()][1:])  # drops q9
    out = tmp_path / "out"
    assert run_main(["compare", str(run_a), str(run_b), "--output_dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "has 9 questions" in error and "'q9'" in error and "--allow_different_questions" in error
    assert not out.exists()
    args = ["compare", str(run_a), str(run_b), "--output_dir", str(out), "--allow_different_questions", "true"]
    assert run_main(args) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [row["questions"] for row in rows] == ["9", "9"] and float(rows[1]["difference"]) == pytest.approx(2 / 9)

    write_jsonl(tmp_path / "bad.jsonl", [{"id": "q0", "correct": True}, {"id": "q0", "correct": False}])
    assert run_main(["compare", str(run_a), str(tmp_path / "bad.jsonl"), "--output_dir", str(out)]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: id 'q0' appears twice" in capsys.readouterr().err


def test_compare_reads_slot_arms_and_repeats(tmp_path):
    folder = tmp_path / "slot/version_0/samples/test_step0"
    baseline = [True, False, False, True]
    slot = [True, True, True, False]
    for arm, values in (("log_times_0_lr_0.1", baseline), ("log_times_5_lr_0.1", slot)):
        rows = [{"id": str(i), "correct": c, "format_ok": True} for i, c in enumerate(values)]
        write_jsonl(folder / f"{arm}.jsonl", rows)
    (folder / "summary.json").write_text(json.dumps({"arms": {"log_times_0_lr_0.1": {}, "log_times_5_lr_0.1": {}}}))
    out = tmp_path / "out"
    assert run_main(["compare", str(tmp_path / "slot/version_0"), "--output_dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    accuracy = [row for row in rows if row["metric"] == "accuracy"]
    assert [row["input"] for row in accuracy] == ["log_times_0_lr_0.1", "log_times_5_lr_0.1"]
    assert (accuracy[1]["fixed"], accuracy[1]["broken"]) == ("2", "1")
    assert {row["metric"] for row in rows} == {"accuracy", "format_accuracy"}

    repeats = repeat_rows(4, 4, seed=3)
    for row, other in zip(repeats, ("0", "1", "2", "3"), strict=True):
        row["id"] = other
    write_jsonl(tmp_path / "repeats/samples/test_step0.jsonl", repeats)
    summary = write_jsonl(tmp_path / "repeats/samples/test_step0_summary.json", [])  # only its name is read
    args = ["compare", str(summary), str(folder / "summary.json"), "--output_dir", str(out)]
    assert run_main([*args, "--reference", "log_times_5_lr_0.1"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {row["metric"] for row in rows} >= {"maj@4", "pass@4"}
    repeat_accuracy = next(r for r in rows if r["metric"] == "accuracy" and r["input"] == str(summary))
    expected = np.mean([row["correct"] for row in repeats]) - np.mean(slot)
    assert float(repeat_accuracy["difference"]) == pytest.approx(expected)
    assert "Single-sample accuracy" in (out / "compare.md").read_text()
