"""`python cli.py analyze`: rank logs merged with evaluation samples, accuracy against the chosen tokens' ranks.

Inputs: a samples file (`samples/test_step{S}.jsonl` or `predictions.jsonl`; one row per question, repeated
samples in "predictions"/"samples_correct" or one in "prediction"/"correct") and its rank log
(`..._ranks.jsonl` / `rank_logs.jsonl`: {"id", "sample", "low_confidence_ranks", "low_probability_ranks"}),
merged by (id, sample), never by position. Analyses (printed, analysis.json, PNG plots):
- accuracy vs the number of logged (low-confidence) steps of a sequence (0..9, 10 = 10+);
- accuracy per sampled rank k (1..9, 10 = 10+): every logged step at rank k counts its sequence's correctness
  once (the reference's merge_low_conf_ranks_seq.py; `rank_counting: sequences` counts each sequence once);
- the same on the single-step subset (exactly one logged step);
- accuracy by mean-rank and by max-rank bins of a sequence's logged steps;
- majority vote per question over all samples vs only over low-rank samples: by default, as the reference, the
  samples whose mean logged rank is <= T (a sample without logged steps is left out) and only the questions
  that keep one; `vote_filter: max` (every logged rank <= T) and `vote_fallback: true` (a question without such
  a sample votes over all of its samples) are ours.
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


def rank_bin(rank: int) -> str:
    return "10+" if rank >= 10 else str(rank)


def by_rank(sequences: list[dict], counting: str) -> dict:
    """Accuracy per sampled rank k (1..9, "10+"). occurrences: every logged step at rank k counts its sequence's
    correctness; sequences: the sequences with at least one logged step at rank k, once each."""
    labels = [rank_bin(k) for k in range(1, 11)]
    if counting == "sequences":
        return {label: accuracy([s for s in sequences if label in map(rank_bin, s["ranks"])]) for label in labels}
    counts = {label: [0, 0] for label in labels}
    for sequence in sequences:
        for rank in sequence["ranks"]:
            counts[rank_bin(rank)][0] += sequence["correct"]
            counts[rank_bin(rank)][1] += 1
    return {label: {"occurrences": n, "accuracy": c / n if n else None} for label, (c, n) in counts.items()}


def majority_votes(sequences: list[dict], vote_filter: str, thresholds: list[float], fallback: bool) -> dict:
    """Majority-vote accuracy over all samples and over the low-rank samples of each question (see `analyze`)."""
    questions: dict[str, list[dict]] = {}
    for sequence in sequences:
        questions.setdefault(sequence["id"], []).append(sequence)

    def vote(group: list[dict]) -> bool:
        return majority_vote([s["prediction"] for s in group], [s["correct"] for s in group])[1]

    def kept(sequence: dict, limit: float) -> bool:
        if vote_filter == "max":
            return max(sequence["ranks"], default=1) <= limit
        return bool(sequence["ranks"]) and sum(sequence["ranks"]) / len(sequence["ranks"]) <= limit

    result = {
        "all samples": {"questions": len(questions), "accuracy": sum(map(vote, questions.values())) / len(questions)}
    }
    for limit in thresholds:
        correct, voted = 0, 0
        for group in questions.values():
            low = [s for s in group if kept(s, limit)]
            if low or fallback:
                voted += 1
                correct += vote(low or group)
        covered = sum(any(kept(s, limit) for s in group) for group in questions.values())
        result[f"{vote_filter} rank <= {limit:g}"] = {
            "accuracy": correct / voted if voted else None,
            "questions": voted,
            "coverage": covered / len(questions),
        }
    return result


def analyses(
    sequences: list[dict], rank_counting: str, vote_filter: str, thresholds: list[float], fallback: bool
) -> dict:
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
        "by_sampled_rank": by_rank(sequences, rank_counting),
        "single_step_by_rank": by_rank([s for s in sequences if len(s["ranks"]) == 1], rank_counting),
        "by_mean_rank": {"no logged step": accuracy([s for s in sequences if not s["ranks"]]), **mean},
        "by_max_rank": top,
        "majority_vote": majority_votes(sequences, vote_filter, thresholds, fallback),
    }


def size(entry: dict) -> int | None:
    """How many sequences (or logged steps) an accuracy entry is over; None for a vote entry."""
    return entry.get("sequences", entry.get("occurrences"))


def plot(path: Path, groups: dict, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, entry in groups.items() if size(entry)]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(labels, [groups[label]["accuracy"] for label in labels])
    for index, label in enumerate(labels):
        axis.annotate(f"n={size(groups[label])}", (index, groups[label]["accuracy"]), ha="center", va="bottom")
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
        if size(entry) is not None:
            extra = f"n={size(entry)}"
        else:
            extra = f"questions={entry['questions']}"
            extra += f", coverage {entry['coverage']:.2f}" if "coverage" in entry else ""
        lines.append(f"  {label:<18}{value:>8}  {extra}")
    return "\n".join(lines)


def analyze(
    samples: str,
    ranks: str,
    output_dir: str,
    log: Literal["low_confidence", "low_probability"] = "low_confidence",
    rank_counting: Literal["occurrences", "sequences"] = "occurrences",
    vote_filter: Literal["mean", "max"] = "mean",
    vote_thresholds: list[float] | None = None,
    vote_fallback: bool = False,
) -> dict:
    """Accuracy against the ranks of the chosen tokens: a table, analysis.json and PNG plots.

    Args:
        samples: evaluation samples (samples/test_step{S}.jsonl or predictions.jsonl).
        ranks: their rank log (samples/test_step{S}_ranks.jsonl or rank_logs.jsonl).
        output_dir: where analysis.json and the plots go.
        log: which rank list to analyse: low_confidence (steps with a low top-1 probability) or
            low_probability (steps where the chosen token's own probability was low).
        rank_counting: accuracy per sampled rank: occurrences (every logged step, the reference's) or sequences
            (each sequence once).
        vote_filter: which samples the conditioned majority vote keeps: mean (mean logged rank <= T, the
            reference's) or max (every logged rank <= T).
        vote_thresholds: the T values (default 2 and 3 for mean, 1, 2, 3 and 5 for max).
        vote_fallback: a question without a kept sample votes over all of its samples (ours) instead of being
            left out of that vote (the reference's).
    """
    thresholds = vote_thresholds or ([2.0, 3.0] if vote_filter == "mean" else [1, 2, 3, 5])
    if any(not isinstance(t, (int, float)) or t < 1 for t in thresholds):
        raise UserInputError(f"analyze: vote_thresholds must be numbers >= 1, got {thresholds}")
    settings = {"rank_counting": rank_counting, "vote_filter": vote_filter, "vote_fallback": vote_fallback}
    result = analyses(merge(Path(samples), Path(ranks), log), rank_counting, vote_filter, thresholds, vote_fallback)
    out = Path(output_dir)
    write_json_atomic(out / "analysis.json", {"samples": samples, "ranks": ranks, "log": log, **settings, **result})
    plot(out / "accuracy_vs_logged_steps.png", result["by_number_of_logged_steps"], f"number of {log} steps")
    plot(out / "accuracy_per_sampled_rank.png", result["by_sampled_rank"], "sampled rank (at a logged step)")
    print(f"overall accuracy {result['overall']['accuracy']:.4f} over {result['overall']['sequences']} sequences")
    for key in ("by_number_of_logged_steps", "by_sampled_rank", "single_step_by_rank", "by_mean_rank",
                "by_max_rank", "majority_vote"):  # fmt: skip
        print(table(key.replace("_", " "), result[key]))
    print(f"Analysis outputs: {out}/")
    return result
