"""Uncertainty of accuracies over questions, and paired comparisons of two arms on the same questions.

- A proportion (accuracy: one 0/1 outcome per question) gets the Wilson score interval.
- A mean of per-question values (maj@k, pass@k) gets a percentile bootstrap over questions: questions are
  resampled with replacement (`resamples` times, seeded), the mean recomputed, and the 2.5 / 97.5 percentiles
  of those means taken.
- Two arms on the same questions: the difference of means, its paired bootstrap interval (the per-question
  differences resampled together), and, for 0/1 outcomes, the exact McNemar test on the discordant pairs
  (b questions the other arm fixed, c it broke): the two-sided binomial test of b successes in b + c at 1/2.
- Repeated sampling (n samples per question): the spread of single-sample accuracy over the n sample indices,
  what another seed could have given.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb, sqrt
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
METHOD = (
    f"{CONFIDENCE:.0%} intervals: Wilson for accuracies, percentile bootstrap over questions ({RESAMPLES} resamples,"
    f" seed {SEED}) for maj@k / pass@k and paired differences; exact McNemar test on the fixed / broken questions"
)
NOISE = "not distinguishable from noise at 5 %"
BETTER = "better than the reference at 5 %"
WORSE = "worse than the reference at 5 %"


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval over questions of the mean of `values` (one value per question)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or len(data) == 0:
        raise ValueError("bootstrap_interval needs one value per question, at least one question")
    rng, n = np.random.default_rng(seed), len(data)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory: at most ~2M question indices drawn at a time
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means[start : start + len(draws)] = data[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `fixed` successes in fixed + broken trials at 1/2."""
    if fixed < 0 or broken < 0:
        raise ValueError(f"mcnemar_exact needs counts >= 0, got {fixed}, {broken}")
    trials = fixed + broken
    tail = sum(comb(trials, i) for i in range(min(fixed, broken) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def verdict(difference_interval: tuple[float, float], p_value: float | None) -> str:
    """Noise unless the interval excludes 0 and (for 0/1 outcomes) McNemar's p < 0.05."""
    low, high = difference_interval
    if (p_value is not None and p_value >= 0.05) or low <= 0 <= high:
        return NOISE
    return BETTER if low > 0 else WORSE


def is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))


def paired_comparison(reference: Sequence[float], other: Sequence[float], **kwargs) -> dict:
    """`other` against `reference`, both one value per question in the same order: difference of the means,
    its paired bootstrap interval and, for 0/1 outcomes, the questions fixed / broken and McNemar's p."""
    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if ref.shape != new.shape or ref.ndim != 1 or len(ref) == 0:
        raise ValueError(f"paired_comparison needs two equal-length lists of values, got {ref.shape}, {new.shape}")
    interval = bootstrap_interval(new - ref, **kwargs)
    result: dict = {"difference": float(new.mean() - ref.mean()), "difference_ci95": list(interval)}
    p_value = None
    if is_binary(ref) and is_binary(new):
        fixed, broken = int(np.sum((new == 1) & (ref == 0))), int(np.sum((new == 0) & (ref == 1)))
        p_value = mcnemar_exact(fixed, broken)
        result.update(fixed=fixed, broken=broken, mcnemar_p=p_value)
    result["verdict"] = verdict(interval, p_value)
    return result


def sample_spread(samples_correct: Sequence[Sequence[bool]]) -> dict:
    """Single-sample accuracy for each sample index j (over questions), and its mean, std (n - 1), min, max."""
    table = np.asarray(samples_correct, dtype=np.float64)
    if table.ndim != 2 or table.size == 0:
        raise ValueError("sample_spread needs the same number (>= 1) of samples for every question")
    per_sample = table.mean(axis=0)
    return {
        "mean": float(per_sample.mean()),
        "std": float(per_sample.std(ddof=1)) if len(per_sample) > 1 else 0.0,
        "min": float(per_sample.min()),
        "max": float(per_sample.max()),
        "per_sample": per_sample.tolist(),
    }
