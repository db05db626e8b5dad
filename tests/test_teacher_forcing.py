"""Teacher-forced scoring equals the full model's log-softmax at the scored positions, whatever the padding."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model
from peft import LoraConfig, get_peft_model

from evaluation.teacher_forcing import teacher_forced_chunks


def reference_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one unpadded sequence through the whole model."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def padded(sequences: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids, mask = (
        torch.zeros(len(sequences), width, dtype=torch.long),
        torch.zeros(len(sequences), width, dtype=torch.long),
    )
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[row, span], mask[row, span] = torch.tensor(sequence), 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
def test_scored_log_probs_match_the_full_model(kind: str, side: str, chunk_tokens: int) -> None:
    model = build_tiny_model(kind, 512).eval()
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in (9, 4, 13)]
    ids, mask = padded(sequences, side)
    scored = mask.bool()
    got: dict[int, list[float]] = {row: [] for row in range(len(sequences))}
    vocab_sizes = set()
    for chunk in teacher_forced_chunks(model, ids, mask, scored, chunk_tokens=chunk_tokens):
        assert len(chunk.rows) <= chunk_tokens
        vocab_sizes.add(chunk.log_probs.shape[-1])
        for row, target, log_probs in zip(chunk.rows.tolist(), chunk.targets, chunk.log_probs, strict=True):
            got[row].append(float(log_probs[target]))
    assert vocab_sizes == {512}
    for row, sequence in enumerate(sequences):
        torch.testing.assert_close(torch.tensor(got[row]), reference_log_probs(model, sequence), atol=1e-5, rtol=1e-5)


def test_only_scored_positions_are_returned_in_row_major_order() -> None:
    model = build_tiny_model("llama", 512).eval()
    ids, mask = padded([[5, 6, 7, 8, 9], [10, 11, 12]], "right")
    scored = torch.zeros_like(mask, dtype=torch.bool)
    scored[0, 3:5], scored[1, 0:3] = True, True  # position 0 can never be scored: nothing predicts it
    chunks = list(teacher_forced_chunks(model, ids, mask, scored, chunk_tokens=2))
    rows = torch.cat([chunk.rows for chunk in chunks]).tolist()
    positions = torch.cat([chunk.positions for chunk in chunks]).tolist()
    assert list(zip(rows, positions, strict=True)) == [(0, 3), (0, 4), (1, 1), (1, 2)]
    assert torch.cat([chunk.targets for chunk in chunks]).tolist() == [8, 9, 11, 12]


def test_a_peft_model_scores_like_its_merged_weights() -> None:
    model = build_tiny_model("llama", 512)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "down_proj"], init_lora_weights=False))
    lora.eval()
    ids, mask = padded([[5, 6, 7, 8, 9, 30, 31]], "right")
    (chunk,) = teacher_forced_chunks(lora, ids, mask, mask.bool())
    merged = lora.merge_and_unload().eval()
    torch.testing.assert_close(
        chunk.log_probs.gather(-1, chunk.targets[:, None])[:, 0], reference_log_probs(merged, ids[0].tolist())
    )


def test_per_row_response_losses_equal_each_rows_own_labels_loss() -> None:
    """Validation's per-question loss: each row's sum equals the model's own `labels=` loss of that row alone."""
    from evaluation.teacher_forcing import response_losses

    model = build_tiny_model("qwen2", 300, tie_word_embeddings=False).eval()
    rows = [[5, 9, 14, 30, 2, 8], [7, 3, 11], [4, 4, 4, 4, 4, 4, 4, 4]]
    labelled_from = [3, 1, 5]  # the response starts here; the prompt before it is not scored
    ids, mask = padded(rows, "right")
    labels = torch.full_like(ids, -100)
    for row, (tokens, start) in enumerate(zip(rows, labelled_from, strict=True)):
        labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
    sums, counts = response_losses(model, ids, mask, labels)
    for row, (tokens, start) in enumerate(zip(rows, labelled_from, strict=True)):
        alone = torch.tensor([tokens])
        own = torch.full_like(alone, -100)
        own[0, start:] = alone[0, start:]
        with torch.no_grad():
            loss = model(input_ids=alone, labels=own).loss
        assert counts[row] == len(tokens) - start
        assert sums[row].item() == pytest.approx(loss.item() * (len(tokens) - start), rel=1e-5)


def test_losses_from_logits_equal_the_chunked_pass() -> None:
    """The FSDP fallback (full logits) and the chunked pass give the same per-row losses."""
    from evaluation.teacher_forcing import losses_from_logits, response_losses

    model = build_tiny_model("llama", 300).eval()
    ids, mask = padded([[5, 9, 14, 30, 2, 8], [7, 3, 11]], "right")
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100
    with torch.no_grad():
        from_logits = losses_from_logits(model(input_ids=ids, attention_mask=mask).logits, labels)
    chunked = response_losses(model, ids, mask, labels)
    torch.testing.assert_close(from_logits[0], chunked[0], rtol=1e-5, atol=1e-5)
    assert from_logits[1].tolist() == chunked[1].tolist() == [4, 1]
