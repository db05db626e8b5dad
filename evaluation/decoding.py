"""Correctness-first decoding: the sampling knobs of "Sample Smart, Not Hard" (arXiv 2510.05987).

Every rule looks at the same distribution p = softmax(scaled logits) and says "keep the top K"; the final K
is the minimum over the active rules (at least 1, so the argmax is always kept) and every other logit becomes
-inf. The rules, their formulas and their order are those of decoding_and_calibration.md ("The sampling knobs").

Ties: "the top K" is undefined when the K-th and (K+1)-th scaled logits are equal. Here every token tied with
the K-th one is kept (as HF's top-k does), so the kept set depends on the distribution only, never on token
ids (upstream breaks such ties arbitrarily). Exact ties are rare in float32, not in bf16 models' logits.

The HF engine samples through `evaluation.seeding.SeededSampler` (this filter, then one draw per sequence from
its own seeded generator), vLLM through `evaluation.vllm_processor` (this filter, then vLLM's sampler): neither
engine's own temperature / top-k / top-p / min-p is used, so nothing is filtered twice and no filtering setting
is inherited from a model's generation_config.json. transformers' own warpers would not always agree: HF
applies them one after another, each on what the previous one left, so two filtering rules together are not
"the minimum K on one p", and its top_p keeps a token when the mass before it is strictly < top_p (the reference:
<= top_p); with a temperature plus one of top_k, min_p, prob_threshold (epsilon), hewitt_epsilon (eta) they
give the same kept set (tests/test_decoding.py checks both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from core.errors import UserInputError


@dataclass
class DecodingSpec:
    """How the next token is chosen: temperature 0 is greedy; otherwise sample from the tokens every rule keeps."""

    temperature: float = 1.0
    """Divide the logits by this; 0 = greedy (keep only the argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus: keep K = #{cumulative prob <= top_p} + 1 tokens (1.0 = off)."""
    min_p: float = 0.0
    """Keep tokens with prob >= min_p * top-1 prob (0 = off)."""
    prob_threshold: float = 0.0
    """Epsilon sampling: keep tokens with prob >= this (0 = off)."""
    hewitt_epsilon: float = 0.0
    """Eta sampling: keep tokens with prob >= min(eps, sqrt(eps) * exp(-entropy)) (0 = off)."""
    greedy_threshold: float = 0.0
    """Go greedy at steps whose top-1 prob is below this (0 = off)."""
    dynamic_top_k: list[int] | None = None
    """Calibrated top-k: 10 ints >= 1, the k for top-1 prob in [0.9, 1], [0.8, 0.9), ..., [0, 0.1)."""
    edt_var: list[float] | None = None
    """Entropy-dependent temperature N, theta, T0 (all > 0): T = T0 * N^(theta / H); replaces temperature."""
    confidence_bin_only: int | None = None
    """Sample only at steps whose top-1 prob is in this bin (1 = [0, 0.1) ... 10 = [0.9, 1]); greedy elsewhere."""
    cal_acc: list[float] | None = None
    """Calibrated epsilon A, B, thr: keep tokens whose estimated correctness 10^A * p^B is >= thr (B, thr > 0)."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserInputError(f"decoding.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserInputError(f"decoding.top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"decoding.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserInputError(f"decoding.min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("prob_threshold", "hewitt_epsilon"):
            if not 0 <= getattr(self, name) < 1:
                raise UserInputError(f"decoding.{name} must be in [0, 1) (0 = off), got {getattr(self, name)}")
        if not 0 <= self.greedy_threshold <= 1:
            raise UserInputError(f"decoding.greedy_threshold must be in [0, 1] (0 = off), got {self.greedy_threshold}")
        if self.dynamic_top_k is not None:
            _check_list("dynamic_top_k", self.dynamic_top_k, 10, "integers", _is_int)
            if min(self.dynamic_top_k) < 1:
                raise UserInputError(f"decoding.dynamic_top_k values must be >= 1, got {list(self.dynamic_top_k)}")
        if self.edt_var is not None:
            _check_list("edt_var", self.edt_var, 3, "numbers (N, theta, T0)", _is_number)
            if min(self.edt_var) <= 0:
                raise UserInputError(f"decoding.edt_var N, theta and T0 must all be > 0, got {list(self.edt_var)}")
            if self.temperature != 1:
                raise UserInputError("decoding.edt_var replaces decoding.temperature: leave temperature at 1.0")
        if self.confidence_bin_only is not None and not (
            _is_int(self.confidence_bin_only) and 1 <= self.confidence_bin_only <= 10
        ):
            raise UserInputError(
                f"decoding.confidence_bin_only must be an integer 1..10, got {self.confidence_bin_only}"
            )
        if self.cal_acc is not None:
            _check_list("cal_acc", self.cal_acc, 3, "numbers (A, B, thr)", _is_number)
            if not (self.cal_acc[1] > 0 and self.cal_acc[2] > 0):
                raise UserInputError(f"decoding.cal_acc B and thr must be > 0, got {list(self.cal_acc)}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: only the argmax is kept (greedy decoding)."""
        return self.temperature == 0

    @property
    def cuts(self) -> bool:
        """Some rule may cut tokens (every knob but the temperature / EDT scaling, and greedy decoding)."""
        scaling = ("temperature", "edt_var")
        return self.greedy or any(getattr(self, f.name) != f.default for f in fields(self) if f.name not in scaling)

    @property
    def is_plain(self) -> bool:
        """Every knob at its default: sampling from the model's distribution untouched."""
        return all(getattr(self, f.name) == f.default for f in fields(self))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_list(name: str, values, length: int, what: str, valid) -> None:
    if not isinstance(values, (list, tuple)):
        raise UserInputError(f"decoding.{name} needs a list of exactly {length} {what}, got {values!r}")
    if len(values) != length:
        raise UserInputError(f"decoding.{name} needs exactly {length} {what}, got {len(values)}")
    if not all(valid(v) for v in values):
        raise UserInputError(f"decoding.{name} needs exactly {length} {what}, got {list(values)}")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of softmax(logits), -inf logits allowed (computed as HF's EtaLogitsWarper does)."""
    return torch.distributions.Categorical(logits=logits, validate_args=False).entropy()


def edt_temperature(logits: torch.Tensor, n: float, theta: float, t0: float) -> torch.Tensor:
    """EDT's per-row temperature T0 * exp(max((theta / H) * ln N, 1e-5)), H of the raw logits (>= eps)."""
    h = entropy(logits).clamp(min=torch.finfo(logits.dtype).eps)
    return t0 * torch.exp(((theta / h) * math.log(n)).clamp(min=1e-5))


def scale(spec: DecodingSpec, logits: torch.Tensor) -> torch.Tensor:
    """Rule 1: EDT when set, else the temperature (0 counts as 1 here; rule 12 makes it greedy)."""
    if spec.edt_var is not None:
        return logits / edt_temperature(logits, *spec.edt_var)[:, None]
    return logits if spec.temperature in (0, 1) else logits / spec.temperature


def keep_counts(
    spec: DecodingSpec, scaled: torch.Tensor, probs: torch.Tensor, sorted_probs: torch.Tensor
) -> torch.Tensor:
    """Rules 3-12: the per-row K (long, 1..V)."""
    vocab = scaled.shape[-1]
    pmax = probs.amax(dim=-1, keepdim=True)
    k = torch.full((scaled.shape[0],), vocab, dtype=torch.long, device=scaled.device)

    def count(kept: torch.Tensor) -> torch.Tensor:  # K = #{kept}, at least 1
        return kept.sum(dim=-1).clamp(min=1)

    confidence_bin = (pmax[:, 0] * 10).floor().long().clamp(max=9)  # 0 = [0, 0.1) ... 9 = [0.9, 1]
    if spec.top_k:
        k = k.clamp(max=spec.top_k)
    if spec.dynamic_top_k is not None:
        table = torch.tensor(spec.dynamic_top_k, dtype=torch.long, device=k.device)
        k = torch.minimum(k, table[9 - confidence_bin])  # element 0 for pmax in [0.9, 1]
    if spec.prob_threshold:
        k = torch.minimum(k, count(probs >= spec.prob_threshold))
    if spec.min_p:
        k = torch.minimum(k, count(probs >= spec.min_p * pmax))
    if spec.top_p < 1:
        k = torch.minimum(k, (sorted_probs.cumsum(dim=-1) <= spec.top_p).sum(dim=-1) + 1)
    if spec.hewitt_epsilon:
        eps = torch.tensor(spec.hewitt_epsilon, device=scaled.device)
        threshold = torch.minimum(eps, eps.sqrt() * torch.exp(-entropy(scaled)))
        k = torch.minimum(k, count(probs >= threshold[:, None]))
    if spec.greedy_threshold:
        k = torch.where(pmax[:, 0] < spec.greedy_threshold, 1, k)
    if spec.confidence_bin_only is not None:
        k = torch.where(confidence_bin + 1 != spec.confidence_bin_only, 1, k)  # bin 1 = [0, 0.1)
    if spec.cal_acc is not None:
        a, b, threshold = spec.cal_acc
        k = torch.minimum(k, count(10**a * probs**b >= threshold))
    if spec.greedy:
        k = torch.ones_like(k)
    return k.clamp(min=1, max=vocab)


def filter_logits(spec: DecodingSpec, logits: torch.Tensor) -> torch.Tensor:
    """The formulas, once for every engine: scaled logits [B, V] with everything outside the per-row top K at
    -inf (K the minimum over the active rules on the same p = softmax(scaled logits); one sort per batch)."""
    scaled = scale(spec, logits)
    if not spec.cuts:  # K = V: nothing to sort
        return scaled
    probs = scaled.softmax(dim=-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    k = keep_counts(spec, scaled, probs, probs.gather(-1, order))
    kth_logit = sorted_logits.gather(-1, (k - 1)[:, None])
    return scaled.masked_fill(scaled < kth_logit, -math.inf)  # ties with the K-th logit are kept


def filter_rows(specs: list[DecodingSpec | None], logits: torch.Tensor) -> torch.Tensor:
    """`filter_logits` per row with each row's own spec (None = row left as it is); rows sharing a spec are
    filtered together. What an engine batching requests with different settings (vLLM) applies."""
    groups: dict[str, list[int]] = {}
    for row, spec in enumerate(specs):
        if spec is not None:
            groups.setdefault(repr(spec), []).append(row)
    if not groups:
        return logits
    logits = logits.clone()
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        logits[index] = filter_logits(specs[rows[0]], logits[index])
    return logits
