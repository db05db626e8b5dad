"""generation.engine: vllm: one decoding formula for both engines, engine settings and refusals, and (when vLLM is
installed) the engine end to end against the HF engine."""

from __future__ import annotations

import importlib.util
from dataclasses import fields

import pytest
import torch
from helpers import REPO, read_jsonl, run_cli

from core.errors import UserInputError
from evaluation.decoding import DecodingSpec, filter_logits, filter_rows
from evaluation.generation import GenerationSpec, VllmSettings

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]')")

# One spec per configs/decoding/*.yaml rule (and two knobs together): the study's knobs.
KNOBS = [
    DecodingSpec(),
    DecodingSpec(temperature=0.7),
    DecodingSpec(top_k=5),
    DecodingSpec(top_p=0.9),
    DecodingSpec(min_p=0.1),
    DecodingSpec(prob_threshold=0.02),
    DecodingSpec(hewitt_epsilon=0.02),
    DecodingSpec(temperature=0.6, hewitt_epsilon=0.001),
    DecodingSpec(greedy_threshold=0.3),
    DecodingSpec(edt_var=[2.0, 0.7, 0.8]),
    DecodingSpec(confidence_bin_only=2),
    DecodingSpec(dynamic_top_k=[1, 2, 2, 3, 4, 5, 6, 8, 10, 12]),
    DecodingSpec(cal_acc=[-0.1, 0.5, 0.05]),
    DecodingSpec(top_k=20, min_p=0.05),
]


def knob_name(spec: DecodingSpec) -> str:
    changed = {f.name: getattr(spec, f.name) for f in fields(spec) if getattr(spec, f.name) != f.default}
    return ",".join(f"{name}={value}" for name, value in changed.items()) or "plain"


def model_like_logits(rows: int = 6, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    """Peaked and flat rows (top-1 probabilities from ~0.05 to ~0.99), as a model's next-token logits."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * torch.linspace(0.5, 4.0, rows)[:, None]
    logits[torch.arange(rows), torch.arange(rows)] += torch.linspace(0.0, 8.0, rows)
    return logits


def hf_engine_distribution(spec: DecodingSpec, logits: torch.Tensor) -> torch.Tensor:
    """What the HF engine samples from under `spec` (`SeededSampler`: the filter, renormalised)."""
    return filter_logits(spec, logits.clone()).softmax(-1)


def test_filter_rows_gives_each_row_its_own_specs_result():
    logits = model_like_logits(rows=len(KNOBS) + 1)
    specs = [*KNOBS, None]
    out = filter_rows(specs, logits)
    for row, spec in enumerate(KNOBS):
        alone = filter_logits(spec, logits[row : row + 1])
        assert torch.equal(out[row : row + 1], alone), spec
    assert torch.equal(out[-1], logits[-1])  # no spec: untouched
    assert torch.equal(filter_rows([None] * logits.shape[0], logits), logits)


def test_generation_engine_settings_are_checked():
    assert GenerationSpec().engine == "hf"
    with pytest.raises(UserInputError, match="generation.engine must be hf or vllm, got 'tgi'"):
        GenerationSpec(engine="tgi")
    with pytest.raises(UserInputError, match="gpu_memory_utilization must be in"):
        VllmSettings(gpu_memory_utilization=1.5)
    with pytest.raises(UserInputError, match="tensor_parallel_size must be an integer >= 1"):
        VllmSettings(tensor_parallel_size=0)
    with pytest.raises(UserInputError, match="dtype must be one of model, auto, float32, bfloat16, float16"):
        VllmSettings(dtype="fp8")


def test_engine_vllm_without_vllm_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(UserInputError) as error:
        GenerationSpec(engine="vllm")
    assert str(error.value) == (
        "generation.engine=vllm needs vLLM, which is not installed: pip install -e '.[vllm]' (or use hf)"
    )


def test_vllm_runs_in_the_models_dtype_unless_told(tiny_llama):
    from evaluation.vllm_engine import engine_dtype
    from models.loading import ModelSpec, load_model

    model = load_model(ModelSpec(name=str(tiny_llama)))  # float32
    assert VllmSettings().dtype == "model" and engine_dtype(model, VllmSettings()) == "float32"
    assert engine_dtype(model.to(torch.bfloat16), VllmSettings()) == "bfloat16"
    assert engine_dtype(model, VllmSettings(dtype="float16")) == "float16"
    assert engine_dtype(model, VllmSettings(dtype="auto")) == "auto"  # vLLM's choice, asked for by name


def vllm_spec(**overrides) -> GenerationSpec:
    """A GenerationSpec with engine vllm whether or not vLLM is installed (its check bypassed)."""
    spec = GenerationSpec(**overrides)
    spec.engine = "vllm"
    return spec


def test_slot_and_fit_refuse_engine_vllm(tiny_llama):
    from lightning_modules.finetune import CausalLMFineTuner
    from lightning_modules.slot_eval import SLOTEvaluator
    from models.loading import ModelSpec

    with pytest.raises(UserInputError, match=r"^SLOT \(model.generation\) generates with the HF engine only"):
        SLOTEvaluator(backbone=ModelSpec(name=str(tiny_llama)), generation=vllm_spec())
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="full", generation=vllm_spec())
    with pytest.raises(UserInputError, match="^fit's in-loop validation .* generates with the HF engine only"):
        module.setup("fit")
    module.setup("test")  # test and predict take vllm


def test_unknown_engine_setting_is_one_clear_error(tiny_llama, tmp_path, capsys):
    from cli import main

    args = ["test", "--config", str(REPO / "configs/decoding_gsm8k.yaml"),
            "--model.init_args.backbone.name", str(tiny_llama), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.generation.vllm.tensor_paralel_size", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "tensor_paralel_size" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ the vLLM adapter itself
@needs_vllm
@pytest.mark.parametrize("spec", KNOBS, ids=lambda spec: knob_name(spec))
def test_vllm_adapter_leaves_the_hf_engines_distribution(spec):
    """Same logits, both engines: identical kept sets and renormalised probabilities (vLLM samples from the
    softmax of what its processors return at temperature 1: its sampler is not run here)."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from evaluation.vllm_engine import sampling_params
    from evaluation.vllm_processor import CorrectnessFirstLogitsProcessor

    logits = model_like_logits()
    params = sampling_params(GenerationSpec(decoding=spec), eos_ids=[2], seed=0, logprobs=False)
    assert params.temperature == 1.0 and params.top_k in (0, -1) and params.top_p == 1.0 and params.min_p == 0.0
    processor = CorrectnessFirstLogitsProcessor(None, torch.device("cpu"), False)
    CorrectnessFirstLogitsProcessor.validate_params(params)
    added = [(row, params, [1, 2], []) for row in range(logits.shape[0])]
    processor.update_state(BatchUpdate(batch_size=logits.shape[0], removed=[], added=added, moved=[]))
    vllm_probs = processor.apply(logits.clone()).softmax(-1)
    hf_probs = hf_engine_distribution(spec, logits)
    assert torch.equal(vllm_probs > 0, hf_probs > 0)  # the kept sets
    assert torch.allclose(vllm_probs, hf_probs, rtol=1e-5, atol=1e-7)
    plain = SamplingParams(temperature=1.0)
    processor.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, plain, [1], [])], moved=[]))
    assert torch.equal(processor.apply(logits.clone())[0], logits[0])  # a request without a rule: untouched


@needs_vllm
def test_vllm_adapter_follows_removals_moves_and_swaps():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from evaluation.vllm_engine import sampling_params
    from evaluation.vllm_processor import CorrectnessFirstLogitsProcessor

    top_k, min_p = DecodingSpec(top_k=3), DecodingSpec(min_p=0.2)
    top_k_params, min_p_params = (sampling_params(GenerationSpec(decoding=s), [2], 0, False) for s in (top_k, min_p))
    processor = CorrectnessFirstLogitsProcessor(None, torch.device("cpu"), False)
    added = [(0, top_k_params, [1], []), (1, min_p_params, [1], []), (2, top_k_params, [1], [])]
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    swap = (0, 1, MoveDirectionality.SWAP)
    processor.update_state(BatchUpdate(batch_size=3, removed=[2], added=[], moved=[swap]))
    logits = model_like_logits(rows=2)
    expected = torch.cat([filter_rows([min_p], logits[:1]), filter_rows([top_k], logits[1:])])
    assert torch.equal(processor.apply(logits), expected)
    move = (1, 0, MoveDirectionality.UNIDIRECTIONAL)
    processor.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[move]))
    assert processor.specs == {0: top_k}
    with pytest.raises(ValueError, match="decoding.top_k must be an integer >= 0"):
        CorrectnessFirstLogitsProcessor.validate_params(
            SamplingParams(extra_args={"reasoning_lab_decoding": {"top_k": -1}})
        )


@needs_vllm
def test_vllm_sends_one_request_per_sample_seeded_as_the_hf_engine(tiny_llama, monkeypatch):
    """Question q's sample k is its own request with seed `sample_seed(seed, q, k)`, the HF engine's rule; the
    completions come back in the HF engine's order (question i's samples at i*n .. i*n+n-1)."""
    from types import SimpleNamespace

    from evaluation import vllm_engine
    from evaluation.seeding import sample_seed
    from models.loading import ModelSpec, load_model, load_tokenizer

    sent = {}

    class RecordingLLM:
        def generate(self, prompts, params, use_tqdm):
            sent.update(prompts=prompts, params=params)
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[40 + i])]) for i in range(len(prompts))]

    monkeypatch.setattr(vllm_engine, "engine", lambda *args: RecordingLLM())
    spec = ModelSpec(name=str(tiny_llama))
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    pad = tokenizer.pad_token_id
    ids, mask = torch.tensor([[pad, 7, 8], [9, 10, 11]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    generation = GenerationSpec(repeats=3, at_k=[1], decoding=DecodingSpec(temperature=0.8), seed=5)
    completions = vllm_engine.generate_vllm(model, tokenizer, ids, mask, generation, ["qa", "qb"])
    assert [prompt["prompt_token_ids"] for prompt in sent["prompts"]] == [[7, 8]] * 3 + [[9, 10, 11]] * 3
    assert [params.seed for params in sent["params"]] == [sample_seed(5, q, k) for q in ("qa", "qb") for k in range(3)]
    assert all(params.n == 1 for params in sent["params"])
    assert completions == [tokenizer.decode([40 + i], skip_special_tokens=True) for i in range(6)]


# ------------------------------------------------------------------------------------- the engine end to end
VLLM_ON_CPU = [
    "--model.init_args.generation.engine", "vllm",
    "--model.init_args.generation.vllm.gpu_memory_utilization", "0.3",
    "--model.init_args.generation.vllm.cpu_kv_cache_gib", "2",
    "--model.init_args.generation.vllm.enforce_eager", "true",
    "--model.init_args.generation.vllm.max_model_len", "2048",
]  # fmt: skip


@needs_vllm
@pytest.mark.slow
def test_greedy_engines_agree_on_the_embedded_model(tmp_path):
    """fp32, greedy, 16 GSM8K questions x 64 tokens, the default engine settings (vLLM in the model's dtype):
    vLLM and HF give identical completions and rank logs, and each says which dtype it ran in."""
    from models.loading import ModelSpec, load_tokenizer

    common = ["--config", str(REPO / "configs/decoding_gsm8k.yaml"),
              "--config", str(REPO / "configs/decoding/greedy.yaml"),
              "--data.test_limit", "16", "--data.eval_batch_size", "8", "--model.init_args.backbone.dtype", "float32",
              "--data.lm_eval.max_gen_toks", "64",
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    rows = {}
    for engine, extra in (("hf", []), ("vllm", VLLM_ON_CPU)):
        result = run_cli("test", *common, "--trainer.logger.init_args.save_dir", str(tmp_path / engine), *extra)
        assert f"generation: engine {engine} in float32 (" in result.stderr
        samples = tmp_path / engine / "decoding_gsm8k/version_0/samples"
        rows[engine] = {row["id"]: row for row in read_jsonl(samples / "test_step0.jsonl")}
        rows[engine + "_ranks"] = {line["id"]: line for line in read_jsonl(samples / "test_step0_ranks.jsonl")}
    assert rows["hf"].keys() == rows["vllm"].keys() and len(rows["hf"]) == 16
    assert all(rows["hf"][i].keys() == rows["vllm"][i].keys() for i in rows["hf"])  # one schema
    tokenizer = load_tokenizer(ModelSpec())
    divergences = []
    for question_id, hf in rows["hf"].items():
        a, b = hf["completion"], rows["vllm"][question_id]["completion"]  # one sample: the row's own fields
        if a != b:
            x, y = tokenizer(a)["input_ids"], tokenizer(b)["input_ids"]
            start = next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y)))
            divergences.append(f"{question_id}: token {start}: {tokenizer.decode(x[start:start + 3])!r} vs "
                               f"{tokenizer.decode(y[start:start + 3])!r}")  # fmt: skip
    print("divergences:", divergences)
    assert not divergences
    assert all(rows["hf"][i]["prediction"] == rows["vllm"][i]["prediction"] for i in rows["hf"])
    hf_ranks, vllm_ranks = rows["hf_ranks"], rows["vllm_ranks"]
    for i in rows["hf"]:  # low_confidence 1.0 (the default): every step is logged, each at rank 1 under greedy
        assert hf_ranks[i]["low_confidence_ranks"] == vllm_ranks[i]["low_confidence_ranks"], i
        assert set(vllm_ranks[i]["low_confidence_ranks"]) == {1}
    # the chosen token's probability at the low_probability threshold: one near-tie between kernels is allowed
    differ = [i for i in rows["hf"] if hf_ranks[i]["low_probability_ranks"] != vllm_ranks[i]["low_probability_ranks"]]
    assert len(differ) <= 1, differ


@needs_vllm
@pytest.mark.slow
def test_predict_with_repeats_on_a_planning_lora_export_under_vllm(tmp_path):
    """A LoRA + planning-token fit's merged export, `predict` with 4 samples under vllm: planning tokens are in the
    engine's vocabulary and in completions, never in what is scored; rank logs align by (id, sample); the rows
    have the HF engine's schema and their metrics are those of their own samples."""
    from helpers import run_dir, run_main, save_tiny, tiny_args

    from evaluation.sampling_metrics import majority_vote, question_metrics
    from tasks.planning import PlanningSpec
    from tasks.scoring import get_answer_format, score_completion

    model = save_tiny(tmp_path / "tiny", "llama", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                      num_key_value_heads=1)  # head size 64: one vLLM's CPU attention takes  # fmt: skip
    short = ["--trainer.max_steps", "2", "--data.train_limit", "8", "--data.val_size", "3"]
    assert run_main(["fit", *tiny_args(model, tmp_path / "fit", *short)]) == 0
    export = run_dir(tmp_path / "fit") / "epoch_0"
    planning = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)  # configs/planning_gsm8k.yaml's
    predict = [*tiny_args(export, tmp_path / "predict", "--model.init_args.mode", "full"),
               "--data.test_limit", "3", "--model.init_args.generation.max_new_tokens", "32",
               "--model.init_args.generation.repeats", "4", "--model.init_args.generation.at_k", "[1, 2, 4]",
               "--model.init_args.generation.decoding.temperature", "1.0",
               "--model.init_args.generation.decoding.min_p", "0.001",
               "--model.init_args.rank_log", "{low_confidence: 1.0, low_probability: 1.0}"]  # fmt: skip
    run_cli("predict", *predict, *VLLM_ON_CPU)
    assert run_main(["predict", *predict[:-2], "--trainer.logger.init_args.save_dir", str(tmp_path / "hf")]) == 0
    run = run_dir(tmp_path / "predict")
    rows, hf_rows = read_jsonl(run / "predictions.jsonl"), read_jsonl(run_dir(tmp_path / "hf") / "predictions.jsonl")
    assert len(rows) == 3 and [row.keys() for row in rows] == [row.keys() for row in hf_rows]
    tokens = planning.tokens()
    from transformers import AutoTokenizer

    vocabulary = AutoTokenizer.from_pretrained(export).get_vocab()
    assert all(token in vocabulary for token in tokens)
    assert any(token in text for row in rows for text in row["completions"] for token in tokens)
    answer_format = get_answer_format("gsm8k")  # planning_gsm8k.yaml's task
    for row in rows:
        assert len(row["completions"]) == 4
        scored = [score_completion(answer_format, planning.remove_tokens(c), row["answer"]) for c in row["completions"]]
        assert row["predictions"] == [p for p, _ in scored] and row["samples_correct"] == [c for _, c in scored]
        assert not any(token in str(p) for p in row["predictions"] for token in tokens)
        assert row["metrics"] == question_metrics(row["predictions"], row["samples_correct"], [1, 2, 4])
        assert (row["prediction"], row["correct"]) == majority_vote(row["predictions"], row["samples_correct"])
    ranks = read_jsonl(run / "rank_logs.jsonl")
    assert [(line["id"], line["sample"]) for line in ranks] == [(row["id"], s) for row in rows for s in range(4)]
    assert all(1 <= len(line["low_confidence_ranks"]) <= 32 for line in ranks)  # threshold 1: every step
