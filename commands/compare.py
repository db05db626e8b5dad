"""`python cli.py compare RUN_OR_SUMMARY ...`: one table across runs or arms, on the questions they share.

Each input is one or more columns of the table:
- a run directory (`runs/<experiment>/version_N`): its newest `samples/test_step{S}.jsonl`, or the arms of
  its newest SLOT folder `samples/test_step{S}/`, or else its `predictions.jsonl`;
- a samples JSONL (`test_step{S}.jsonl`, `predictions.jsonl`, one SLOT arm's `{arm}.jsonl`) or the
  `test_step{S}_summary.json` beside one;
- a SLOT arms folder or its `summary.json`: one column per arm (named `{input}:{arm}`, or `{arm}` when it is
  the only input).
Rows are matched by question id. Per metric (accuracy, format accuracy, maj@k, pass@k: those every row of an
input carries), each input gets its mean with a 95 % interval and, against the reference, the difference with
a paired bootstrap interval, the questions fixed / broken, the exact McNemar p-value and a verdict
(evaluation/statistics.py). Inputs with repeated samples also get the spread of single-sample accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from core.errors import UserInputError
from core.io import check_name, figure_png, write_file_set
from core.records import read_json_records
from evaluation.statistics import METHOD, paired_comparison, sample_spread
from evaluation.summaries import interval_text, metric_summary

COLUMNS = ["metric", "input", "questions", "value", "ci95_low", "ci95_high", "difference", "difference_ci95_low",
           "difference_ci95_high", "fixed", "broken", "mcnemar_p", "verdict"]  # fmt: skip
SPREAD_COLUMNS = ["input", "samples", "mean", "std", "min", "max"]


def arm_files(folder: Path, label: str | None) -> list[tuple[str, Path]]:
    """One (label, file) per arm of a SLOT arms folder, baseline first (the order of its summary.json)."""
    try:
        arms = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["arms"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{folder / 'summary.json'}: not a SLOT arms summary ({error})") from None
    names = [check_name(arm, f"{folder / 'summary.json'}: arm") for arm in arms]
    return [(f"{label}:{arm}" if label else arm, folder / f"{arm}.jsonl") for arm in names]


def sample_files(argument: str, only_input: bool) -> list[tuple[str, Path]]:
    """The (label, samples file) pairs an input stands for (see the module docstring)."""
    path = Path(argument)
    arms_label = None if only_input else argument
    if path.is_dir():
        if (path / "summary.json").is_file():
            return arm_files(path, arms_label)
        steps = [
            (int(match.group(1)), candidate)
            for candidate in (path / "samples").glob("test_step*")
            if (match := re.fullmatch(r"test_step(\d+)(\.jsonl)?", candidate.name))
            and (candidate.is_file() or (candidate / "summary.json").is_file())
        ]
        if steps:
            newest = max(steps)[1]
            return arm_files(newest, arms_label) if newest.is_dir() else [(argument, newest)]
        if (path / "predictions.jsonl").is_file():
            return [(argument, path / "predictions.jsonl")]
        raise UserInputError(f"{path}: no samples/test_step*.jsonl, SLOT arms folder or predictions.jsonl in it")
    if path.name == "summary.json":
        return arm_files(path.parent, arms_label)
    if path.name.endswith("_summary.json"):
        path = path.with_name(path.name.removesuffix("_summary.json") + ".jsonl")
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    return [(argument, path)]


def read_rows(path: Path) -> dict[str, dict]:
    """Evaluation rows by question id; each needs an "id" (once) and a boolean "correct"; "metrics" (when
    present) maps names to finite numbers, "samples_correct" is a list of booleans."""
    rows, places = read_json_records(path)
    by_id: dict[str, dict] = {}
    for place, row in zip(places, rows, strict=True):
        if "id" not in row or not isinstance(row.get("correct"), bool):
            raise UserInputError(f"{place}: an evaluation row needs an 'id' and a boolean 'correct'")
        if str(row["id"]) in by_id:
            raise UserInputError(f"{place}: id {row['id']!r} appears twice")
        check_row_fields(row, place)
        by_id[str(row["id"])] = row
    return by_id


def check_row_fields(row: dict, place: str) -> None:
    """The optional fields compare reads as numbers: one line naming the place and the field when one is not."""
    metrics = row.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise UserInputError(f"{place}: field 'metrics' must be an object of numbers, got {metrics!r:.80}")
        for name, value in metrics.items():
            if not is_number(value):
                raise UserInputError(f"{place}: field 'metrics.{name}' must be a number, got {value!r:.80}")
    samples = row.get("samples_correct")
    if samples is not None and not (isinstance(samples, list) and samples and all(type(s) is bool for s in samples)):
        raise UserInputError(
            f"{place}: field 'samples_correct' must be a non-empty list of true/false, got {samples!r:.80}"
        )


def is_number(value: object) -> bool:
    """A finite JSON number (true / false count as 1 / 0)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def shared_ids(inputs: dict[str, dict[str, dict]], reference: str, allow_different: bool) -> list[str]:
    """The question ids every input has, in the reference's order; different sets are refused unless allowed."""
    shared = set.intersection(*(set(rows) for rows in inputs.values()))
    if not shared:
        raise UserInputError("compare: the inputs share no question id")
    for label, rows in inputs.items():
        if not allow_different and set(rows) != set(inputs[reference]):
            only = sorted(set(rows) ^ set(inputs[reference]))
            raise UserInputError(
                f"compare: {label} has {len(rows)} questions and {reference} {len(inputs[reference])}, "
                f"{len(only)} not in both (e.g. id {only[0]!r}); pass --allow_different_questions true to compare "
                f"on the {len(shared)} shared questions"
            )
    return [question for question in inputs[reference] if question in shared]


def metric_values(rows: list[dict]) -> dict[str, list[float]]:
    """Per metric every row carries: one value per question (accuracy, format_accuracy, maj@k, pass@k)."""
    values = {"accuracy": [float(row["correct"]) for row in rows]}
    if all("format_ok" in row for row in rows):
        values["format_accuracy"] = [float(bool(row["format_ok"])) for row in rows]
    names = set.intersection(*(set(row.get("metrics") or {}) for row in rows))
    for name in sorted(names, key=metric_order):
        values[name] = [float(row["metrics"][name]) for row in rows]
    return values


def metric_order(name: str) -> tuple[str, int, str]:
    """maj@2 before maj@10; names without a number after "@" sort by name."""
    base, _, k = name.partition("@")
    return (base, int(k), "") if k.isdecimal() else (base, 0, k)


def comparison(inputs: dict[str, list[dict]], reference: str) -> dict:
    """The table's rows (one per metric and input) and the single-sample spreads, from aligned rows."""
    values = {label: metric_values(rows) for label, rows in inputs.items()}
    metrics = list(dict.fromkeys(name for per_input in values.values() for name in per_input))
    table = []
    for metric in metrics:
        for label, per_input in values.items():
            if metric not in per_input:
                continue
            summary = metric_summary(metric, per_input[metric])
            row = dict.fromkeys(COLUMNS)
            row.update(metric=metric, input=label, questions=len(per_input[metric]), value=summary[metric])
            row["ci95_low"], row["ci95_high"] = summary[f"{metric}_ci95"]
            if label != reference and metric in values[reference]:
                paired = paired_comparison(values[reference][metric], per_input[metric])
                row["difference_ci95_low"], row["difference_ci95_high"] = paired.pop("difference_ci95")
                row.update(paired)
            table.append(row)
    spreads = []
    for label, rows in inputs.items():
        if all("samples_correct" in row for row in rows) and len({len(row["samples_correct"]) for row in rows}) == 1:
            samples = [row["samples_correct"] for row in rows]
            spreads.append({"input": label, "samples": len(samples[0]), **sample_spread(samples)})
    return {"rows": table, "single_sample_accuracy": spreads}


def markdown(result: dict) -> str:
    """The comparison as Markdown: one table of every metric and input, then the single-sample spreads."""
    lines = [
        f"Reference: `{result['reference']}`, {result['questions']} shared questions. {METHOD}.",
        "",
        *(f"- `{label}`: {path}" for label, path in result["inputs"].items()),
        "",
        "| metric | input | questions | value [95 % CI] | difference [95 % CI] | fixed | broken | McNemar p | verdict"
        " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        value = interval_text(row["value"], (row["ci95_low"], row["ci95_high"]))
        if row["difference"] is None:
            difference = "(reference)" if row["input"] == result["reference"] else "-"
        else:
            interval = (row["difference_ci95_low"], row["difference_ci95_high"])
            difference = interval_text(row["difference"], interval, signed=True)
        p_value = "-" if row["mcnemar_p"] is None else f"{row['mcnemar_p']:.4g}"
        cells = [row["metric"], f"`{row['input']}`", row["questions"], value, difference,
                 "-" if row["fixed"] is None else row["fixed"], "-" if row["broken"] is None else row["broken"],
                 p_value, row["verdict"] or ""]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if result["single_sample_accuracy"]:
        lines += ["", "Single-sample accuracy across the sample indices (what another seed could give):", "",
                  "| input | samples | mean | std | min | max |", "|---|---|---|---|---|---|"]  # fmt: skip
        for spread in result["single_sample_accuracy"]:
            numbers = " | ".join(f"{spread[key]:.4f}" for key in ("mean", "std", "min", "max"))
            lines.append(f"| `{spread['input']}` | {spread['samples']} | {numbers} |")
    return "\n".join(lines) + "\n"


def csv_text(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result["rows"])
    return buffer.getvalue()


def plot(result: dict) -> bytes:
    """One panel per metric: each input's value with its 95 % interval as error bars (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(row["metric"] for row in result["rows"]))
    width = min(30.0, 2.5 + 1.2 * len(metrics) * len(result["inputs"]))
    figure, _ = plt.subplots(1, len(metrics), figsize=(width, 4.5), squeeze=False)
    for axis, metric in zip(figure.axes, metrics, strict=True):
        rows = [row for row in result["rows"] if row["metric"] == metric]
        values = [row["value"] for row in rows]
        errors = [[row["value"] - row["ci95_low"] for row in rows], [row["ci95_high"] - row["value"] for row in rows]]
        colours = ["tab:gray" if row["input"] == result["reference"] else "tab:blue" for row in rows]
        axis.bar(range(len(rows)), values, yerr=errors, capsize=4, color=colours)
        axis.set_xticks(range(len(rows)), [row["input"][-30:] for row in rows], rotation=30, ha="right", fontsize=8)
        axis.set_title(metric)
        axis.set_ylim(0, 1.05)
    figure.suptitle(f"95 % intervals over {result['questions']} shared questions (grey: reference)", fontsize=9)
    figure.tight_layout()
    return figure_png(figure)


def compare(
    inputs: list[str],
    output_dir: str = "runs/compare",
    reference: str | None = None,
    allow_different_questions: bool = False,
) -> dict:
    """One table across runs or arms (Markdown, CSV, a PNG with error bars) with paired statistics.

    Args:
        inputs: run directories, samples JSONL files (or their *_summary.json) and SLOT arms folders (or their
            summary.json); given as words: `python cli.py compare RUN_A RUN_B --output_dir out`.
        output_dir: where compare.md, compare.csv and compare.png go (written as a set: all three or none).
        reference: the input (column label, or the unique label ending with it, e.g. an arm's name) the
            others are compared with; default: the first.
        allow_different_questions: compare on the questions every input shares instead of refusing inputs
            whose question sets differ.
    """
    files = [pair for argument in inputs for pair in sample_files(argument, only_input=len(inputs) == 1)]
    labels = [label for label, _ in files]
    if not files or len(set(labels)) != len(labels):
        raise UserInputError(f"compare: needs inputs with distinct names, got {labels}")
    chosen = labels[0] if reference is None else reference
    matches = [label for label in labels if label == chosen] or [label for label in labels if label.endswith(chosen)]
    if len(matches) != 1:
        raise UserInputError(f"compare: --reference {chosen!r} must name exactly one of {labels}")
    by_label = {label: read_rows(path) for label, path in files}
    ids = shared_ids(by_label, matches[0], allow_different_questions)
    aligned = {label: [rows[question] for question in ids] for label, rows in by_label.items()}
    result = {
        "reference": matches[0],
        "questions": len(ids),
        "inputs": {label: str(path) for label, path in files},
        "not_shared": {label: len(rows) - len(ids) for label, rows in by_label.items()},
        **comparison(aligned, matches[0]),
    }
    out = Path(output_dir)
    table = markdown(result)  # every output is made before any is written: a failure leaves none (or the old set)
    write_file_set(out, {"compare.md": table, "compare.csv": csv_text(result), "compare.png": plot(result)})
    print(table + f"Outputs: {out}/compare.md, compare.csv, compare.png")
    return result
