"""`python cli.py analyze`: rank logs merged with evaluation samples, accuracy against the chosen tokens' ranks.

Inputs: a samples file (`samples/test_step{S}.jsonl` or `predictions.jsonl`; one row per question, repeated
samples in "predictions"/"samples_correct" or one in "prediction"/"correct") and its rank log
(`..._ranks.jsonl` / `rank_logs.jsonl`: {"id", "sample", "low_confidence_ranks", "low_probability_ranks"}),
merged by (id, sample), never by position. Analyses (printed, analysis.json, PNG plots):
- accuracy vs the number of logged (low-confidence) steps of a sequence (0..9, 10 = 10+);
- accuracy per sampled rank k (1..9, 10 = 10+): sequences with at least one logged step at rank k;
- the same on the single-step subset (exactly one logged step);
- accuracy by mean-rank and by max-rank bins of a sequence's logged steps;
- majority vote per question over all samples vs only over low-rank samples (every logged rank <= R), with
  the share of questions that have such a sample (others fall back to all their samples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from core.errors import UserInputError
from core.io import atomic_path, write_json_atomic
from core.records import read_json_records
from evaluation.sampling_metrics import majority_vote

MEAN_BINS = [(1.0, 1.0, "1"), (1.0, 1.5, "(1, 1.5]"), (1.5, 2.0, "(1.5, 2]"), (2.0, 3.0, "(2, 3]"),
             (3.0, 5.0, "(3, 5]"), (5.0, 10.0, "(5, 10]"), (10.0, float("inf"), ">10")]  # fmt: skip
MAX_BINS = [(1, 1, "1"), (2, 2, "2"), (3, 3, "3"), (4, 5, "4-5"), (6, 10, "6-10"), (11, 10**9, ">10")]


def merge(samples: Path, ranks: Path, log: str) -> list[dict]:
    """One entry per sequence: id, sample, prediction, correct and its logged ranks (matched by id and sample)."""
    sequences = {}
    rows, places = read_json_records(samples)
    for place, row in zip(places, rows, strict=True):
        try:
            predictions = row["predictions"] if "predictions" in row else [row["prediction"]]
            correct = row["samples_correct"] if "samples_correct" in row else [row["correct"]]
            for sample, (prediction, right) in enumerate(zip(predictions, correct, strict=True)):
                sequences[(str(row["id"]), sample)] = {"id": str(row["id"]), "sample": sample,
                                                       "prediction": prediction, "correct": bool(right)}  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise UserInputError(f"{place}: not an evaluation sample row ({error})") from None
    key = f"{log}_ranks"
    lines, places = read_json_records(ranks)
    for place, line in zip(places, lines, strict=True):
        where = (str(line.get("id")), line.get("sample", 0))
        if where not in sequences:
            raise UserInputError(f"{place}: id {where[0]!r} sample {where[1]} is not in {samples}")
        values = line.get(key)
        if not isinstance(values, list) or not all(isinstance(v, int) and v >= 1 for v in values):
            raise UserInputError(f"{place}: '{key}' must be a list of ranks >= 1")
        if "ranks" in sequences[where]:
            raise UserInputError(f"{place}: id {where[0]!r} sample {where[1]} appears twice")
        sequences[where]["ranks"] = values
    missing = [where for where, sequence in sequences.items() if "ranks" not in sequence]
    if missing:
        raise UserInputError(f"{ranks}: no ranks for {len(missing)} sequences of {samples}, e.g. id {missing[0][0]!r}")
    return list(sequences.values())


def accuracy(sequences: list[dict]) -> dict:
    return {
        "sequences": len(sequences),
        "accuracy": sum(s["correct"] for s in sequences) / len(sequences) if sequences else None,
    }


def by_rank(sequences: list[dict]) -> dict:
    """Accuracy of the sequences with at least one logged step at rank k (k = 1..9, "10+")."""
    result = {}
    for k in range(1, 11):
        hit = [s for s in sequences if any((r >= 10) if k == 10 else (r == k) for r in s["ranks"])]
        result["10+" if k == 10 else str(k)] = accuracy(hit)
    return result


def majority_votes(sequences: list[dict], max_ranks: list[int]) -> dict:
    """Majority-vote accuracy over all samples and over the samples whose logged ranks are all <= R."""
    questions: dict[str, list[dict]] = {}
    for sequence in sequences:
        questions.setdefault(sequence["id"], []).append(sequence)

    def vote(group: list[dict]) -> bool:
        return majority_vote([s["prediction"] for s in group], [s["correct"] for s in group])[1]

    result = {
        "all samples": {"questions": len(questions), "accuracy": sum(map(vote, questions.values())) / len(questions)}
    }
    for limit in max_ranks:
        correct, covered = 0, 0
        for group in questions.values():
            low = [s for s in group if max(s["ranks"], default=1) <= limit]
            covered += bool(low)
            correct += vote(low or group)
        result[f"max rank <= {limit}"] = {"accuracy": correct / len(questions), "coverage": covered / len(questions)}
    return result


def analyses(sequences: list[dict], max_ranks: list[int]) -> dict:
    counts = {}
    for n in range(11):
        group = [s for s in sequences if (len(s["ranks"]) >= 10 if n == 10 else len(s["ranks"]) == n)]
        counts["10+" if n == 10 else str(n)] = accuracy(group)
    logged = [s for s in sequences if s["ranks"]]

    def in_bin(value: float, low: float, high: float) -> bool:  # (low, high], or exactly low when low == high
        return value == low if low == high else low < value <= high

    mean_rank = {id(s): sum(s["ranks"]) / len(s["ranks"]) for s in logged}
    mean = {
        label: accuracy([s for s in logged if in_bin(mean_rank[id(s)], low, high)]) for low, high, label in MEAN_BINS
    }
    top = {label: accuracy([s for s in logged if low <= max(s["ranks"]) <= high]) for low, high, label in MAX_BINS}
    return {
        "overall": accuracy(sequences),
        "by_number_of_logged_steps": counts,
        "by_sampled_rank": by_rank(sequences),
        "single_step_by_rank": by_rank([s for s in sequences if len(s["ranks"]) == 1]),
        "by_mean_rank": {"no logged step": accuracy([s for s in sequences if not s["ranks"]]), **mean},
        "by_max_rank": top,
        "majority_vote": majority_votes(sequences, max_ranks),
    }


def plot(path: Path, groups: dict, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, entry in groups.items() if entry["sequences"]]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(labels, [groups[label]["accuracy"] for label in labels])
    for index, label in enumerate(labels):
        axis.annotate(f"n={groups[label]['sequences']}", (index, groups[label]["accuracy"]), ha="center", va="bottom")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.1)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def table(title: str, groups: dict) -> str:
    lines = [title]
    for label, entry in groups.items():
        value = "-" if entry.get("accuracy") is None else f"{entry['accuracy']:.4f}"
        if "sequences" in entry:
            extra = f"n={entry['sequences']}"
        else:
            extra = f"questions={entry['questions']}" if "questions" in entry else f"coverage {entry['coverage']:.2f}"
        lines.append(f"  {label:<18}{value:>8}  {extra}")
    return "\n".join(lines)


def analyze(
    samples: str,
    ranks: str,
    output_dir: str,
    log: Literal["low_confidence", "low_probability"] = "low_confidence",
    max_ranks: list[int] | None = None,
) -> dict:
    """Accuracy against the ranks of the chosen tokens: a table, analysis.json and PNG plots.

    Args:
        samples: evaluation samples (samples/test_step{S}.jsonl or predictions.jsonl).
        ranks: their rank log (samples/test_step{S}_ranks.jsonl or rank_logs.jsonl).
        output_dir: where analysis.json and the plots go.
        log: which rank list to analyse: low_confidence (steps with a low top-1 probability) or
            low_probability (steps where the chosen token's own probability was low).
        max_ranks: the R of "majority vote over samples whose logged ranks are all <= R" (default 1, 2, 3, 5).
    """
    max_ranks = max_ranks or [1, 2, 3, 5]
    if any(not isinstance(r, int) or r < 1 for r in max_ranks):
        raise UserInputError(f"analyze: max_ranks must be integers >= 1, got {max_ranks}")
    result = analyses(merge(Path(samples), Path(ranks), log), max_ranks)
    out = Path(output_dir)
    write_json_atomic(out / "analysis.json", {"samples": samples, "ranks": ranks, "log": log, **result})
    plot(out / "accuracy_vs_logged_steps.png", result["by_number_of_logged_steps"], f"number of {log} steps")
    plot(out / "accuracy_per_sampled_rank.png", result["by_sampled_rank"], "sampled rank (at a logged step)")
    print(f"overall accuracy {result['overall']['accuracy']:.4f} over {result['overall']['sequences']} sequences")
    for key in ("by_number_of_logged_steps", "by_sampled_rank", "single_step_by_rank", "by_mean_rank",
                "by_max_rank", "majority_vote"):  # fmt: skip
        print(table(key.replace("_", " "), result[key]))
    print(f"Analysis outputs: {out}/")
    return result
