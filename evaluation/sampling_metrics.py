"""Metrics of repeated sampling: majority vote (maj@k) and the unbiased pass@k estimator.

maj@k votes over the FIRST k samples of a question (as lm-eval's take_first_k + majority_vote filters do):
the most common extracted answer wins (ties: the one seen first); samples with no extractable answer do not
vote. pass@k = 1 - C(n - c, k) / C(n, k) for n samples of which c are correct (Chen et al., 2021).
"""

from __future__ import annotations

from collections import Counter
from math import comb


def majority_vote(predictions: list[str | None], correct: list[bool]) -> tuple[str | None, bool]:
    """(winning answer, whether it is correct); (None, False) when no sample has an answer."""
    votes = Counter(prediction for prediction in predictions if prediction is not None)
    if not votes:
        return None, False
    winner = votes.most_common(1)[0][0]  # Counter keeps first-seen order among ties
    return winner, correct[predictions.index(winner)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples drawn from the n (c correct) is correct."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def question_metrics(predictions: list[str | None], correct: list[bool], ks: list[int]) -> dict[str, float]:
    """{"maj@k": 0/1, "pass@k": estimate} of one question for every k in `ks` that is <= the sample count."""
    n, metrics = len(predictions), {}
    for k in sorted(set(ks)):
        if k <= n:
            metrics[f"maj@{k}"] = float(majority_vote(predictions[:k], correct[:k])[1])
            metrics[f"pass@{k}"] = pass_at_k(n, sum(correct), k)
    return metrics


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """The mean of every maj@k / pass@k over the rows that carry it."""
    names = sorted(
        {name for row in rows for name in row.get("metrics", {})}, key=lambda s: (s.split("@")[0], int(s.split("@")[1]))
    )
    return {name: sum(row["metrics"][name] for row in rows) / len(rows) for name in names}
