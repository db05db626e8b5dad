"""Summaries of evaluation rows with their uncertainty: the `test` summary, the arms summary, their tables.

Rows are the per-question dicts evaluation writes ({"id", "correct", ...}; with repeated sampling also
"samples_correct" and "metrics" {maj@k, pass@k}; SLOT arms also "arm", "format_ok", "slot_loss"). Every
accuracy comes with its 95 % interval under "<metric>_ci95" (see evaluation/statistics.py for the methods).
"""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.sampling_metrics import mean_metrics
from evaluation.statistics import METHOD, bootstrap_interval, paired_comparison, sample_spread, wilson_interval

FORMAT_FLAGS = {"format_ok": "format_accuracy", "format_ok_lenient": "format_accuracy_lenient"}
"""Per-row format flags (SLOT) and the accuracy each one gives."""
PROPORTIONS = ("accuracy", *FORMAT_FLAGS.values())  # one 0/1 outcome per question: Wilson intervals


def metric_summary(name: str, values: Sequence[float]) -> dict:
    """{name: mean, name_ci95: [low, high]}: Wilson for a proportion, bootstrap over questions otherwise."""
    mean = sum(values) / len(values)
    if name in PROPORTIONS:
        interval = wilson_interval(int(sum(bool(value) for value in values)), len(values))
    else:
        interval = bootstrap_interval(values)
    return {name: mean, f"{name}_ci95": list(interval)}


def evaluation_summary(rows: list[dict]) -> dict:
    """Questions, accuracy (with repeats: the majority vote over all samples) and, with repeated sampling,
    every maj@k / pass@k and the spread of single-sample accuracy over the sample indices; all with intervals."""
    summary = {"questions": len(rows), **metric_summary("accuracy", [bool(row["correct"]) for row in rows])}
    if "samples_correct" in rows[0]:
        summary["samples_per_question"] = len(rows[0]["samples_correct"])
        for name in mean_metrics(rows):
            summary.update(metric_summary(name, [row["metrics"][name] for row in rows]))
        summary["single_sample_accuracy"] = sample_spread([row["samples_correct"] for row in rows])
    for filter_name, metrics in rows[0].get("lm_eval", {}).items():  # an lm-eval task's filters, as lm-eval reports
        for metric in metrics:
            values = [row["lm_eval"][filter_name][metric] for row in rows]
            summary.update(metric_summary(f"lm_eval/{filter_name}/{metric}", values))
    summary["intervals"] = METHOD
    return summary


def interval_text(value: float, interval: Sequence[float], signed: bool = False) -> str:
    """`0.4200 [0.2900, 0.5600]` (`+0.0400 [-0.0100, +0.0900]` when signed)."""
    form = "+.4f" if signed else ".4f"
    return f"{value:{form}} [{interval[0]:{form}}, {interval[1]:{form}}]"


def summary_table(summary: dict) -> str:
    """An evaluation summary as a console table: metric, value [95 % CI]."""
    lines = [f"{'metric':<12}{'value [95 % CI]':>26}   ({summary['questions']} questions)"]
    for name, value in summary.items():
        if f"{name}_ci95" in summary:
            lines.append(f"{name:<12}{interval_text(value, summary[f'{name}_ci95']):>26}")
    if "single_sample_accuracy" in summary:
        spread = summary["single_sample_accuracy"]
        lines.append(
            f"single-sample accuracy over {summary['samples_per_question']} samples: mean {spread['mean']:.4f}, "
            f"std {spread['std']:.4f}, min {spread['min']:.4f}, max {spread['max']:.4f}"
        )
    return "\n".join(lines)


def arms_summary(by_arm: dict[str, list[dict]]) -> dict:
    """Per arm: accuracy (and format accuracy / mean final loss when rows carry them) with intervals; for every
    arm after the first (the baseline): the ids it fixed or broke and, on the same questions, the difference
    with its paired interval, McNemar's p and a verdict ("vs_baseline")."""
    baseline_name = next(iter(by_arm))
    baseline = {row["id"]: bool(row["correct"]) for row in by_arm[baseline_name]}
    arms = {}
    for arm, rows in by_arm.items():
        correct = [bool(row["correct"]) for row in rows]
        entry = {"questions": len(rows), **metric_summary("accuracy", correct)}
        for flag, name in FORMAT_FLAGS.items():
            if flag in rows[0]:
                entry.update(metric_summary(name, [bool(row[flag]) for row in rows]))
        if "slot_loss" in rows[0]:
            entry["mean_final_loss"] = sum(row["slot_loss"][-1] for row in rows) / len(rows)
        if arm != baseline_name:
            entry["fixed"] = sorted(row["id"] for row in rows if row["correct"] and not baseline[row["id"]])
            entry["broken"] = sorted(row["id"] for row in rows if not row["correct"] and baseline[row["id"]])
            entry["vs_baseline"] = paired_comparison([baseline[row["id"]] for row in rows], correct)
        arms[arm] = entry
    return {"baseline": baseline_name, "arms": arms, "intervals": METHOD}


def arms_table(summary: dict) -> str:
    """The arms summary as a console table: accuracy [95 % CI], format accuracy, loss, flips, paired test."""
    header = (
        f"{'arm':<28}{'questions':>10}{'accuracy [95 % CI]':>27}{'format_accuracy [95 % CI]':>28}"
        f"{'mean_final_loss':>17}{'fixed':>7}{'broken':>8}{'diff [95 % CI]':>28}{'McNemar p':>11}  verdict"
    )
    lines = [header]
    for arm, entry in summary["arms"].items():
        line = f"{arm:<28}{entry['questions']:>10}{interval_text(entry['accuracy'], entry['accuracy_ci95']):>27}"
        if "format_accuracy" in entry:
            line += f"{interval_text(entry['format_accuracy'], entry['format_accuracy_ci95']):>28}"
        else:
            line += f"{'-':>28}"
        line += f"{entry['mean_final_loss']:>17.4f}" if "mean_final_loss" in entry else f"{'-':>17}"
        if "vs_baseline" in entry:
            paired = entry["vs_baseline"]
            difference = interval_text(paired["difference"], paired["difference_ci95"], signed=True)
            line += f"{len(entry['fixed']):>7}{len(entry['broken']):>8}{difference:>28}"
            line += f"{paired['mcnemar_p']:>11.4g}  {paired['verdict']}"
        else:
            line += f"{'-':>7}{'-':>8}{'(baseline)':>28}{'-':>11}"
        lines.append(line)
    return "\n".join(lines)
