"""Correctness-first decoding: each knob against hand-computed K, min-K intersection, HF-warper equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.errors import UserInputError
from evaluation.decoding import DecodingSpec, edt_temperature, filter_logits
from evaluation.generation import GenerationSpec, generation_config
from evaluation.seeding import SeededSampler
from models.loading import ModelSpec, load_model, load_tokenizer

# Six tokens; probabilities by token id. By rank: 0.40 (id 1), 0.25 (id 3), 0.15 (id 4), 0.10 (id 0),
# 0.06 (id 5), 0.04 (id 2). cumsum by rank: 0.40, 0.65, 0.80, 0.90, 0.96, 1.00.
PROBS = [0.10, 0.40, 0.04, 0.25, 0.15, 0.06]
RANKED = [1, 3, 4, 0, 5, 2]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def top(k: int) -> set[int]:
    return set(RANKED[:k])


def process(spec: DecodingSpec, logits: torch.Tensor) -> torch.Tensor:
    return filter_logits(spec, logits)


def kept(spec: DecodingSpec, probs: list[float] = PROBS) -> set[int]:
    return set(torch.isfinite(process(spec, logits_of(probs))[0]).nonzero().flatten().tolist())


def test_each_classic_knob_keeps_the_hand_computed_top_k():
    assert kept(DecodingSpec(top_k=3)) == top(3)
    assert kept(DecodingSpec(prob_threshold=0.12)) == top(3)  # #{p >= 0.12} = {.40, .25, .15} = 3
    assert kept(DecodingSpec(min_p=0.5)) == top(2)  # threshold 0.5 * 0.40 = 0.20: {.40, .25} = 2
    assert kept(DecodingSpec(top_p=0.7)) == top(3)  # #{cumsum <= 0.7} = #{.40, .65} = 2, K = 2 + 1
    assert kept(DecodingSpec(top_p=0.3)) == top(1)  # no cumsum <= 0.3: K = 0 + 1
    assert kept(DecodingSpec(top_p=0.85)) == top(4)  # #{.40, .65, .80} = 3, K = 4


def test_eta_threshold_uses_the_entropy_of_the_scaled_distribution():
    # H = -sum p ln p = .3665 + .3466 + .2846 + .2303 + .1688 + .1288 = 1.5255; exp(-H) = 0.2175
    entropy = -sum(p * math.log(p) for p in PROBS)
    assert entropy == pytest.approx(1.5255, abs=1e-4)
    # eps = 0.2: min(0.2, sqrt(0.2) * 0.2175 = 0.0973) = 0.0973 -> {.40, .25, .15, .10} = 4
    assert min(0.2, math.sqrt(0.2) * math.exp(-entropy)) == pytest.approx(0.0973, abs=1e-4)
    assert kept(DecodingSpec(hewitt_epsilon=0.2)) == top(4)
    # eps = 0.01: min(0.01, 0.1 * 0.2175 = 0.0218) = 0.01 -> all 6
    assert kept(DecodingSpec(hewitt_epsilon=0.01)) == top(6)
    # At temperature 2 the scaled p is flatter (higher H): p ~ sqrt(PROBS) renormalised = .255 .202 .156 .128 .099
    # .081; H = 1.752, exp(-H) = .1734, threshold = min(0.2, .4472 * .1734 = .0776) -> p >= .0776: all 6
    assert kept(DecodingSpec(hewitt_epsilon=0.2, temperature=2.0)) == top(6)


def test_cal_acc_keeps_tokens_whose_estimated_correctness_clears_the_threshold():
    # c = 10^-0.1 * p^0.5 = 0.7943 * (.6325, .5, .3873, .3162, ...) = .502, .397, .308, .251, ... >= 0.3 -> K = 3
    assert kept(DecodingSpec(cal_acc=[-0.1, 0.5, 0.3])) == top(3)
    assert kept(DecodingSpec(cal_acc=[-0.1, 0.5, 2.0])) == top(1)  # no c >= 2: at least the argmax


def test_greedy_threshold_and_temperature_zero_go_greedy():
    assert kept(DecodingSpec(greedy_threshold=0.5)) == top(1)  # pmax 0.40 < 0.5 -> K = 1
    assert kept(DecodingSpec(greedy_threshold=0.3)) == top(6)  # pmax 0.40 >= 0.3 -> no restriction
    logits = logits_of(PROBS)
    greedy = process(DecodingSpec(temperature=0.0), logits)
    assert set(torch.isfinite(greedy[0]).nonzero().flatten().tolist()) == {1}
    assert greedy[0, 1] == logits[0, 1]  # temperature 0 scales by 1, only masks
    assert torch.equal(process(DecodingSpec(temperature=2.0), logits), logits / 2.0)


# pmax 0.95 (six tokens) and pmax 0.05 (21 distinct tokens: 0.05, then 0.04845 down to 0.04655, summing to 1).
CONFIDENT = [0.95, 0.02, 0.012, 0.01, 0.005, 0.003]
UNSURE = [0.05] + [0.0475 + 0.0001 * (10.5 - i) for i in range(1, 21)]


def test_dynamic_top_k_bins_run_from_confident_to_unsure():
    table = [2, 9, 9, 9, 9, 9, 9, 9, 9, 5]
    # pmax 0.95: idx = 9 - min(floor(9.5), 9) = 0 -> K = table[0] = 2
    assert kept(DecodingSpec(dynamic_top_k=table), CONFIDENT) == {0, 1}
    # pmax 0.05: idx = 9 - min(floor(0.5), 9) = 9 -> K = table[9] = 5
    assert kept(DecodingSpec(dynamic_top_k=table), UNSURE) == {0, 1, 2, 3, 4}


def test_confidence_bin_only_bins_run_the_other_way():
    # pmax 0.05: bin = min(floor(0.5), 9) + 1 = 1; pmax 0.95: bin = min(9, 9) + 1 = 10
    assert kept(DecodingSpec(confidence_bin_only=1), UNSURE) == set(range(21))  # inside: unrestricted
    assert kept(DecodingSpec(confidence_bin_only=10), UNSURE) == {0}  # outside: K = 1
    assert kept(DecodingSpec(confidence_bin_only=10), CONFIDENT) == set(range(6))
    assert kept(DecodingSpec(confidence_bin_only=1), CONFIDENT) == {0}


def test_edt_temperature_for_a_known_entropy():
    logits = logits_of([0.5, 0.25, 0.125, 0.125])
    # H = .5 ln2 + .25 * 2 ln2 + 2 * .125 * 3 ln2 = 1.75 ln2; N=2, theta=0.7: (0.7 / (1.75 ln2)) * ln2 = 0.4
    # T = 0.8 * e^0.4 = 0.8 * 1.49182 = 1.19346
    assert edt_temperature(logits, 2.0, 0.7, 0.8).item() == pytest.approx(1.19346, abs=1e-5)
    assert torch.allclose(process(DecodingSpec(edt_var=[2.0, 0.7, 0.8]), logits), logits / 1.19346, atol=1e-5)
    # N = 0.5: ln N < 0, the exponent is clamped to 1e-5, T = T0 * e^1e-5
    assert edt_temperature(logits, 0.5, 0.7, 0.8).item() == pytest.approx(0.8 * math.exp(1e-5), abs=1e-6)


def test_several_knobs_keep_the_minimum_k():
    # top_k 5 -> 5; prob_threshold 0.12 -> 3; top_p 0.85 -> 4: min = 3
    assert kept(DecodingSpec(top_k=5, prob_threshold=0.12, top_p=0.85)) == top(3)
    # + min_p 0.5 (threshold 0.20 -> 2): min = 2; + greedy_threshold 0.5 (pmax 0.40 < 0.5 -> 1): min = 1
    assert kept(DecodingSpec(top_k=5, prob_threshold=0.12, top_p=0.85, min_p=0.5)) == top(2)
    assert kept(DecodingSpec(top_k=5, min_p=0.5, greedy_threshold=0.5)) == top(1)
    # HF's sequential warpers differ: top_k 2 renormalises to (.615, .385), then epsilon 0.3 keeps both;
    # on one p, epsilon 0.3 gives #{p >= 0.3} = 1
    assert kept(DecodingSpec(top_k=2, prob_threshold=0.3)) == top(1)
    sequential = EpsilonLogitsWarper(0.3)(None, TopKLogitsWarper(2)(None, logits_of(PROBS)))
    assert int(torch.isfinite(sequential).sum()) == 2


def test_ties_with_the_kth_logit_are_kept():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(process(DecodingSpec(top_k=2), logits)).tolist() == [[True, True, True, False]]
    greedy = process(DecodingSpec(temperature=0.0), logits[:, 1:])  # tied maxima: K = 1 keeps both
    assert torch.isfinite(greedy).tolist() == [[True, True, False]]


def test_argmax_is_always_kept():
    assert kept(DecodingSpec(prob_threshold=0.9, hewitt_epsilon=0.9, cal_acc=[0.0, 1.0, 5.0], top_p=0.01)) == {1}
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    out = process(DecodingSpec(prob_threshold=0.99, dynamic_top_k=[1] * 10), logits)
    assert torch.isfinite(out.gather(-1, logits.argmax(-1, keepdim=True))).all()
    assert (torch.isfinite(out).sum(-1) == 1).all()


def test_plain_spec_leaves_the_distribution_untouched():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    assert DecodingSpec().is_plain and not DecodingSpec(top_k=3).is_plain
    assert torch.equal(process(DecodingSpec(), logits), logits)
    assert torch.equal(process(DecodingSpec(temperature=0.5), logits), logits / 0.5)
    assert not DecodingSpec(temperature=0.5).cuts and not DecodingSpec(edt_var=[2.0, 0.5, 1.0]).cuts
    assert DecodingSpec(temperature=0.0).cuts and DecodingSpec(top_p=0.9).cuts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dynamic_top_k=[1] * 9), "dynamic_top_k needs exactly 10 integers, got 9"),
        (dict(dynamic_top_k=[1] * 9 + [0]), "dynamic_top_k values must be >= 1"),
        (dict(dynamic_top_k=[1.5] * 10), "dynamic_top_k needs exactly 10 integers"),
        (dict(confidence_bin_only=11), "confidence_bin_only must be an integer 1..10, got 11"),
        (dict(confidence_bin_only=0), "confidence_bin_only must be an integer 1..10, got 0"),
        (dict(edt_var=[2.0, 0.5]), r"edt_var needs exactly 3 numbers \(N, theta, T0\), got 2"),
        (dict(edt_var=[2.0, 0.0, 1.0]), "edt_var N, theta and T0 must all be > 0"),
        (dict(edt_var=[2.0, 0.5, 1.0], temperature=0.7), "edt_var replaces decoding.temperature"),
        (dict(cal_acc=[0.1, 0.5, 0.3, 1.0]), r"cal_acc needs exactly 3 numbers \(A, B, thr\), got 4"),
        (dict(cal_acc=[0.1, -0.5, 0.3]), "cal_acc B and thr must be > 0"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(min_p=1.2), r"min_p must be in \[0, 1\]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(prob_threshold=1.0), r"prob_threshold must be in \[0, 1\)"),
        (dict(hewitt_epsilon=-0.1), r"hewitt_epsilon must be in \[0, 1\)"),
        (dict(greedy_threshold=2.0), r"greedy_threshold must be in \[0, 1\]"),
    ],
)
def test_malformed_values_are_rejected(kwargs, message):
    with pytest.raises(UserInputError, match="decoding." + message):
        DecodingSpec(**kwargs)


def random_logits() -> torch.Tensor:
    """Continuous rows, bf16-rounded rows (many exact ties) and rows with -inf entries (suppressed tokens)."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 300, generator=generator) * 3
    logits[4:8] = logits[4:8].bfloat16().float()
    logits[8:, :40] = -math.inf
    return logits


def hf_chain(kwargs: dict, logits: torch.Tensor) -> torch.Tensor:
    """HF's warpers in the order `generate` adds them, built directly from the GenerationConfig kwargs."""
    if kwargs["temperature"] != 1.0:
        logits = TemperatureLogitsWarper(kwargs["temperature"])(None, logits)
    if kwargs["top_k"]:
        logits = TopKLogitsWarper(kwargs["top_k"])(None, logits)
    if kwargs["top_p"] < 1.0:
        logits = TopPLogitsWarper(kwargs["top_p"])(None, logits)
    if kwargs["min_p"]:
        logits = MinPLogitsWarper(kwargs["min_p"])(None, logits)
    if kwargs["epsilon_cutoff"]:
        logits = EpsilonLogitsWarper(kwargs["epsilon_cutoff"])(None, logits)
    if kwargs["eta_cutoff"]:
        logits = EtaLogitsWarper(kwargs["eta_cutoff"])(None, logits)
    return logits


@pytest.mark.parametrize(
    "spec",
    [
        DecodingSpec(temperature=0.7),
        DecodingSpec(top_k=5),
        DecodingSpec(top_k=40, temperature=1.3),
        DecodingSpec(min_p=0.1),
        DecodingSpec(min_p=0.05, temperature=0.7),
        DecodingSpec(prob_threshold=0.02),
        DecodingSpec(prob_threshold=0.003, temperature=1.5),
        DecodingSpec(hewitt_epsilon=0.02),
        DecodingSpec(hewitt_epsilon=0.001, temperature=0.6),
    ],
    ids=lambda spec: ",".join(f"{k}={v}" for k, v in vars(spec).items() if v != getattr(DecodingSpec(), k)),
)
def test_single_knobs_equal_hf_warpers(spec):
    """HF's warpers are an independent implementation of the single-knob rules: same logits, ties included."""
    kwargs = dict(temperature=float(spec.temperature), top_k=spec.top_k, top_p=1.0, min_p=spec.min_p,
                  epsilon_cutoff=spec.prob_threshold, eta_cutoff=spec.hewitt_epsilon)  # fmt: skip
    logits = random_logits()
    ours, theirs = process(spec, logits), hf_chain(kwargs, logits)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))  # same kept set, ties included
    assert torch.equal(ours, theirs) and torch.equal(ours.softmax(-1), theirs.softmax(-1))
    assert int(torch.isfinite(ours).sum(-1).min()) >= 1


def test_top_p_equals_hfs_but_at_the_boundary():
    logits = random_logits()[:4]  # continuous rows: no prefix mass lands exactly on top_p
    assert torch.equal(process(DecodingSpec(top_p=0.9), logits), TopPLogitsWarper(0.9)(None, logits))
    # p = (.5, .25, .125, .0625, .0625), exact in float32; cumsum .5, .75, ...; top_p = 0.75:
    # reference K = #{cumsum <= .75} + 1 = 3; HF keeps a token only if the mass before it is < .75: 2 tokens
    dyadic = logits_of([0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert kept(DecodingSpec(top_p=0.75), [0.5, 0.25, 0.125, 0.0625, 0.0625]) == {0, 1, 2}
    assert int(torch.isfinite(TopPLogitsWarper(0.75)(None, dyadic)).sum()) == 2


def test_batch_rows_are_processed_independently():
    spec = DecodingSpec(
        edt_var=[2.0, 0.4, 0.7],
        dynamic_top_k=[1, 2, 3, 4, 6, 8, 10, 12, 16, 20],
        hewitt_epsilon=0.01,
        top_p=0.95,
        cal_acc=[0.0, 0.8, 0.02],
    )
    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(3)) * torch.arange(1, 7)[:, None]
    batched = process(spec, logits)
    for row in range(logits.shape[0]):
        alone = process(spec, logits[row : row + 1])
        assert torch.equal(batched[row : row + 1], alone)
    assert len(set(torch.isfinite(batched).sum(-1).tolist())) > 1  # the rows really got different K


def test_sampling_through_generate_stays_in_the_kept_set(tiny_llama):
    """Every token HF's `generate` takes through `SeededSampler` is in the rule's kept set of that step's raw
    logits (HF itself scales and filters nothing: its own logits go to our filter unchanged)."""
    model_spec = ModelSpec(name=str(tiny_llama))
    model, tokenizer = load_model(model_spec).eval(), load_tokenizer(model_spec)
    spec = DecodingSpec(temperature=1.2, top_k=30, min_p=0.02, dynamic_top_k=[1, 2, 3, 4, 5, 6, 8, 10, 15, 20])
    # min_new_tokens: EOS suppressed (-inf before the sampler): every row is live at every step
    config = generation_config(GenerationSpec(max_new_tokens=6, min_new_tokens=6), model, tokenizer)
    ids = torch.tensor([tokenizer("Question: Natalia sold 48 clips.").input_ids] * 3)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=config,
        logits_processor=[SeededSampler(spec, [11, 12, 13])],
        output_logits=True,
        return_dict_in_generate=True,
    )
    chosen = output.sequences[:, ids.shape[1] :]
    assert chosen.shape == (3, 6) and len({tuple(row) for row in chosen.tolist()}) > 1
    for step, raw in enumerate(output.logits):
        raw = raw.float().clone()
        raw[:, tokenizer.eos_token_id] = -math.inf
        kept_now = torch.isfinite(process(spec, raw))
        assert kept_now.gather(-1, chosen[:, step : step + 1]).all()
        assert (kept_now.sum(-1) < raw.shape[-1]).all()  # the rule really cut tokens
