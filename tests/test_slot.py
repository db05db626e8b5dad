"""SLOT: the cached-logit optimisation against a plain autograd implementation, batching, fallbacks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import PROMPTS, REPO, batch_of, load_frozen, run_dir, run_main, save_tiny, tiny_args
from scipy.stats import binomtest

from core.errors import UserInputError
from evaluation.generation import GenerationSpec, generate
from evaluation.slot import SlotArm, cache_copy, head_input_hook, optimise_deltas, prefill
from evaluation.statistics import NOISE
from models.head import OutputHead
from models.loading import ModelSpec, load_model, load_tokenizer


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_frozen(tiny_llama)


@pytest.fixture(scope="module")
def softcapped(tmp_path_factory):
    """A tiny Gemma2: its final logit soft-capping makes the head non-linear (the fallback path)."""
    return load_frozen(save_tiny(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2"))


def reference_slot(model, prompt: str, tokenizer, iters: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """Plain autograd SLOT for one prompt: the whole head recomputed on h + delta every iteration."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    captured = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.update(h=a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    hidden = captured["h"].detach()
    delta = torch.zeros(1, 1, hidden.shape[-1], requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=lr, weight_decay=1e-8, eps=1e-5)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    losses = []
    for _ in range(iters):
        logits = model.get_output_embeddings()(hidden + delta)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return delta.detach(), losses


def reference_greedy(model, tokenizer, prompt: str, delta: torch.Tensor, steps: int) -> str:
    """Greedy decoding with full recomputation (no cache), delta added before the head at every position."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: (a[0] + delta,))
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            if next_id == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    handle.remove()
    return tokenizer.decode(ids[0, len(tokenizer(prompt).input_ids) :], skip_special_tokens=True)


def slot_generate(model, tokenizer, head, ids, mask, delta, steps):
    state = prefill(model, head, ids, mask)
    with head_input_hook(head, delta):
        return generate(
            model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=steps), past_key_values=cache_copy(state.cache)
        )


@pytest.mark.parametrize("which", ["llama", "softcapped"])
def test_delta_and_greedy_tokens_equal_plain_autograd(which, request):
    model, tokenizer = request.getfixturevalue(which)
    head = OutputHead(model)
    assert head.linear == (which == "llama")
    for prompt in PROMPTS[:2]:
        ids, mask = batch_of(tokenizer, [prompt])
        deltas, trace = optimise_deltas(head, prefill(model, head, ids, mask), [5], lr=0.1)
        expected_delta, expected_losses = reference_slot(model, prompt, tokenizer, iters=5, lr=0.1)
        torch.testing.assert_close(deltas[5], expected_delta, atol=1e-5, rtol=0)
        torch.testing.assert_close(trace[0, :5], torch.tensor(expected_losses), atol=1e-5, rtol=0)
        forced, _ = optimise_deltas(head, prefill(model, head, ids, mask), [5], lr=0.1, autograd=True)
        torch.testing.assert_close(forced[5], deltas[5], atol=1e-5, rtol=0)  # both paths, one answer
        assert trace[0, -1] < trace[0, 0]  # the prompt loss went down
        completion = slot_generate(model, tokenizer, head, ids, mask, deltas[5], 12)[0]
        assert completion == reference_greedy(model, tokenizer, prompt, expected_delta, 12)


def test_batched_equals_one_at_a_time(llama):
    model, tokenizer = llama
    head = OutputHead(model)
    ids, mask = batch_of(tokenizer, PROMPTS)
    assert len({int(m.sum()) for m in mask}) == 4  # four different prompt lengths
    deltas, trace = optimise_deltas(head, prefill(model, head, ids, mask), [3], lr=0.1)
    batched = slot_generate(model, tokenizer, head, ids, mask, deltas[3], 10)
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = batch_of(tokenizer, [prompt])
        one_deltas, one_trace = optimise_deltas(head, prefill(model, head, one_ids, one_mask), [3], lr=0.1)
        torch.testing.assert_close(deltas[3][i], one_deltas[3][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(trace[i], one_trace[0], atol=1e-5, rtol=0)
        assert batched[i] == slot_generate(model, tokenizer, head, one_ids, one_mask, one_deltas[3], 10)[0]


def test_iters_zero_is_plain_greedy_generation(llama):
    model, tokenizer = llama
    head = OutputHead(model)
    ids, mask = batch_of(tokenizer, PROMPTS)
    deltas, _ = optimise_deltas(head, prefill(model, head, ids, mask), [0, 2], lr=0.1)
    assert torch.count_nonzero(deltas[0]) == 0 and torch.count_nonzero(deltas[2]) > 0
    plain = generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=16))
    assert slot_generate(model, tokenizer, head, ids, mask, deltas[0], 16) == plain


def test_no_weight_gradients_and_fp32_delta_on_bf16(tiny_llama):
    model = load_model(ModelSpec(name=str(tiny_llama), dtype="bfloat16")).requires_grad_(False).eval()
    tokenizer = load_tokenizer(ModelSpec(name=str(tiny_llama)))
    head = OutputHead(model)
    deltas, trace = optimise_deltas(head, prefill(model, head, *batch_of(tokenizer, PROMPTS[:2])), [2], lr=0.1)
    assert deltas[2].dtype == torch.float32 and torch.isfinite(trace).all()
    assert all(parameter.grad is None for parameter in model.parameters())


def test_bad_arms_and_too_long_prompts(tmp_path, llama):
    with pytest.raises(UserInputError, match="iters"):
        SlotArm(iters=-1)
    with pytest.raises(UserInputError, match="lr"):
        SlotArm(iters=2, lr=0)
    short, tokenizer = load_frozen(save_tiny(tmp_path / "short", "llama", max_position_embeddings=16))
    with pytest.raises(UserInputError, match="context"):
        prefill(short, OutputHead(short), *batch_of(tokenizer, [PROMPTS[2]]))


def slot_cli(model: str, save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO / "cli.py"), "test", "--config", str(REPO / "configs/slot.yaml"),
        "--model.init_args.backbone.name", model, "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)


def read_arms(save_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    folder = next((save_dir / "slot").glob("version_*/samples/test_step*[0-9]"))
    summary = json.loads((folder / "summary.json").read_text())
    logs = {
        arm: [json.loads(line) for line in (folder / f"{arm}.jsonl").read_text().splitlines()]
        for arm in summary["arms"]
    }
    return summary, logs


@pytest.mark.slow
def test_fine_tuned_checkpoint_and_its_export_give_the_same_answers(tiny_llama, tmp_path):

    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path / "fit")]) == 0
    run = run_dir(tmp_path / "fit")
    short = ["--data.test_limit", "3", "--model.init_args.generation.max_new_tokens", "6"]
    from_ckpt = slot_cli(
        str(tiny_llama), tmp_path / "a", *short, "--model.init_args.checkpoint", str(run / "checkpoints/last.ckpt")
    )
    from_export = slot_cli(
        str(tiny_llama), tmp_path / "b", *short, "--model.init_args.checkpoint", str(run / "epoch_0")
    )
    assert from_ckpt.returncode == 0 and from_export.returncode == 0, (
        from_ckpt.stderr[-2000:] + from_export.stderr[-2000:]
    )
    (summary_a, logs_a), (_, logs_b) = read_arms(tmp_path / "a"), read_arms(tmp_path / "b")
    assert list(summary_a["arms"]) == ["log_times_0_lr_0.1", "log_times_5_lr_0.1"]
    for arm in logs_a:
        assert [r["completion"] for r in logs_a[arm]] == [r["completion"] for r in logs_b[arm]]
    missing = slot_cli(str(tiny_llama), tmp_path / "d", *short, "--model.init_args.checkpoint", str(run / "x.ckpt"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_clear_error(tiny_llama, tmp_path):

    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path / "fit", "--data.train_limit", "8")]) == 0
    checkpoint = run_dir(tmp_path / "fit") / "checkpoints/last.ckpt"
    other = save_tiny(tmp_path / "wider", "llama", intermediate_size=96)  # other weights, adapters of other shapes
    result = slot_cli(str(other), tmp_path / "e", "--data.test_limit", "2", "--model.init_args.checkpoint",
                      str(checkpoint), "--model.init_args.generation.max_new_tokens", "4")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"was trained on other base weights than {other}" in result.stderr  # checked before any weight loads


@pytest.mark.slow
def test_empty_dataset_is_one_clear_error(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = slot_cli(str(tiny_llama), tmp_path / "f", "--data.test_path", str(empty))
    assert result.returncode == 2 and "empty.jsonl" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_slot_end_to_end_on_the_embedded_model(tmp_path):
    result = slot_cli(
        "smollm2-135m-instruct", tmp_path, "--data.test_limit", "3", "--data.eval_batch_size", "3",
        "--model.init_args.generation.max_new_tokens", "48",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "log_times_5_lr_0.1" in result.stdout and "fixed" in result.stdout
    summary, logs = read_arms(tmp_path)
    slot_rows = logs["log_times_5_lr_0.1"]
    assert len(slot_rows) == 3 and all(len(row["slot_loss"]) == 6 for row in slot_rows)
    assert all(row["slot_loss"][-1] < row["slot_loss"][0] for row in slot_rows)  # SLOT lowers the prompt loss
    assert (
        summary["arms"]["log_times_5_lr_0.1"]["mean_final_loss"]
        < summary["arms"]["log_times_0_lr_0.1"]["mean_final_loss"]
    )
    assert all("<think>" in row["prompt"] or "think" in row["prompt"] for row in slot_rows)
    events = list((tmp_path / "slot").glob("version_*/events.out.tfevents.*"))
    assert events


@pytest.mark.slow
def test_math500_and_plain_prompts_work_the_same_way(tiny_llama, tmp_path):
    result = slot_cli(
        str(tiny_llama), tmp_path, "--data.task", "math", "--data.answer_format", "math", "--data.test_limit", "2",
        "--data.prompt.style", "plain", "--data.prompt.system_prompt", "null",
        "--model.init_args.generation.max_new_tokens", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary, logs = read_arms(tmp_path)
    rows = logs["log_times_5_lr_0.1"]
    assert len(rows) == 2 and all(row["prompt"].startswith("Question: ") for row in rows)
    entry, baseline = summary["arms"]["log_times_5_lr_0.1"], logs["log_times_0_lr_0.1"]
    wilson = binomtest(sum(row["correct"] for row in rows), 2).proportion_ci(method="wilson")
    assert entry["accuracy_ci95"] == pytest.approx([wilson.low, wilson.high])
    fixed, broken = len(entry["fixed"]), len(entry["broken"])
    assert (entry["vs_baseline"]["fixed"], entry["vs_baseline"]["broken"]) == (fixed, broken)
    assert entry["vs_baseline"]["difference"] == pytest.approx((fixed - broken) / 2)
    assert entry["vs_baseline"]["verdict"] == NOISE  # 2 questions can never be more than noise
    assert entry["vs_baseline"]["mcnemar_p"] == 1.0 and "format_accuracy_ci95" in entry
    assert {row["id"] for row in baseline} == {row["id"] for row in rows} and "McNemar p" in result.stdout
    assert {row["id"] for row in rows} <= {
        json.loads(line)["unique_id"] for line in (REPO / "data/math500/test.jsonl").open()
    }
