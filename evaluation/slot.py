"""SLOT: sample-specific test-time optimisation of a delta added to the last hidden state (Hu et al. 2025).

Per prompt, a vector delta [1, hidden] (fp32, zeros) is added to the backbone's final hidden state right
before the output head and optimised with AdamW on the prompt's own next-token loss; generation then
adds the same delta at every generated position. The backbone runs ONCE per prompt:

- the prefill covers prompt[:-1]: its logits and hidden states are everything the loss needs, and its KV
  cache is where generation continues (from the last prompt token) - no second prefill;
- the head is linear, so logits(h + d) = logits(h) + W d, and exp(logits) factorises: with exp(prompt
  logits) cached once, an iteration's exact loss and gradient are two mat-vecs over that cache plus W·d
  and Wᵀ·g (O(T·V + V·H) instead of O(T·V·H), no autograd, nothing [T, V]-sized written);
- heads that are not linear (final logit soft-capping) take the exact autograd path through the head.

Batches keep one delta per sample and average each sample's loss over its own tokens, so a batch gives
every sample exactly the result it would get alone. Model weights are frozen: no weight gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from core.errors import UserInputError
from models.head import OutputHead


@dataclass
class SlotArm:
    """One evaluation arm: SLOT with `iters` optimisation steps at learning rate `lr` (iters 0 = baseline)."""

    iters: int = 5
    """AdamW steps on the prompt loss (0 = the unmodified model)."""
    lr: float = 0.1
    """AdamW learning rate of delta."""

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise UserInputError(f"model.arms: iters must be >= 0, got {self.iters}")
        if not self.lr > 0:
            raise UserInputError(f"model.arms: lr must be > 0, got {self.lr}")

    @property
    def name(self) -> str:
        """Upstream's naming: log_times_<iters>_lr_<lr>."""
        return f"log_times_{self.iters}_lr_{self.lr:g}"


@contextmanager
def head_input_hook(
    head: OutputHead, delta: torch.Tensor | None = None, record: bool = False
) -> Iterator[list[torch.Tensor]]:
    """While active, `delta` ([batch, 1, hidden]) is added to the head's input; with `record`, every input
    the head sees (after the delta) is appended to the yielded list."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        hidden = args[0] if delta is None else args[0] + delta.to(args[0].dtype)
        if record:
            seen.append(hidden)
        return (hidden, *args[1:])

    handle = head.layer.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class Prefill:
    """The one backbone pass over prompt[:-1] that SLOT and generation share."""

    hidden: torch.Tensor  # [B, T-1, H] head inputs
    logits: torch.Tensor  # [B, T-1, V] fp32 prompt logits
    targets: torch.Tensor  # [B, T-1] next-token ids
    weights: torch.Tensor  # [B, T-1] 1/n_b at a sample's n_b real (position, target) pairs, 0 at padding
    cache: DynamicCache


@torch.no_grad()
def prefill(model: PreTrainedModel, head: OutputHead, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Prefill:
    """Run the backbone once over all but the last prompt token (left-padded batch)."""
    if prompt_ids.shape[1] < 2:
        raise UserInputError("SLOT needs prompts of at least 2 tokens")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context and prompt_ids.shape[1] >= context:
        raise UserInputError(f"a prompt of {prompt_ids.shape[1]} tokens does not fit the model's context ({context})")
    ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded positions
    cache = DynamicCache(config=model.config)
    with head_input_hook(head, record=True) as seen:
        output = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
    hidden, logits = seen[-1], output.logits.float()
    tail = slice(-2, None)  # the last positions are real tokens in every row of a left-padded batch
    if not torch.allclose(head.logits(hidden[:, tail]), logits[:, tail], atol=1e-3, rtol=1e-3):
        raise UserInputError(
            f"SLOT cannot reproduce the logits of {type(model).__name__} from its last hidden state "
            "(an output head transformation it does not know)"
        )
    pairs = (mask * prompt_mask[:, 1:]).float()
    return Prefill(hidden, logits, prompt_ids[:, 1:], pairs / pairs.sum(1, keepdim=True).clamp(min=1), cache)


class CachedLogitLoss:
    """Exact per-sample prompt loss and its gradient in delta for a linear head, without autograd.

    With logits L + s·W·d, exp(L + s·W·d) = exp(L) ⊙ exp(s·W·d): exp(L - rowmax) is computed once, and every
    evaluation is two batched mat-vecs over it (the softmax normalisers, and the softmax mass summed over
    positions) plus W·d and Wᵀ·g. No [B, T, V] tensor is written per iteration.

    The cache is float64: a BLAS mat-vec accumulates a row's 10^4-10^5 terms sequentially in its precision,
    and in float32 the softmax tail (terms below half an ulp of the running sum) is lost - a 3e-4 relative
    error in the normaliser on SmolLM2, where torch's pairwise log_softmax is exact to 1e-7. It costs twice
    the memory of the float32 prompt logits.
    """

    def __init__(self, head: OutputHead, state: Prefill) -> None:
        self.head, self.targets, self.weights = head, state.targets, state.weights
        self.row_max = state.logits.amax(-1)  # [B, T]
        self.exp = (state.logits - self.row_max[..., None]).exp_().double()  # [B, T, V]: float32 terms, float64 sums
        self.target_logits = state.logits.gather(-1, state.targets[..., None])[..., 0]  # [B, T]

    def __call__(self, delta: torch.Tensor, with_gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift = self.head.delta_logits(delta)  # [B, 1, V]: s·W·d, the same at every position
        shift_max = shift.amax(-1, keepdim=True)
        shift_exp = (shift - shift_max).double().exp()
        sums = torch.bmm(self.exp, shift_exp.transpose(1, 2))[..., 0]  # [B, T] softmax normalisers
        log_normaliser = self.row_max + shift_max[..., 0] + sums.log().float()
        target = self.target_logits + shift[:, 0].gather(-1, self.targets)
        losses = ((log_normaliser - target) * self.weights).sum(1)
        if not with_gradient:
            return losses, None
        # d loss / d shift = sum_t w_t (softmax_t - onehot(target_t)); softmax_t = exp_t ⊙ shift_exp / sums_t
        mass = (torch.bmm((self.weights / sums)[:, None], self.exp) * shift_exp).float()  # [B, 1, V]
        mass.scatter_add_(-1, self.targets[:, None], -self.weights[:, None])
        return losses, self.head.delta_logits_grad(mass)


class HeadAutogradLoss:
    """The general path (non-linear heads): the head recomputed on h + delta, differentiated by autograd."""

    def __init__(self, head: OutputHead, state: Prefill) -> None:
        self.head, self.state = head, state

    def __call__(self, delta: torch.Tensor, with_gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad():
            delta = delta.detach().requires_grad_(True)
            logits = self.head.logits(self.state.hidden + delta)
            token_losses = F.cross_entropy(logits.transpose(1, 2), self.state.targets, reduction="none")
            losses = (token_losses * self.state.weights).sum(1)
            (gradient,) = torch.autograd.grad(losses.sum(), delta)  # a sum: each sample gets its own gradient
        return losses.detach(), gradient


def optimise_deltas(
    head: OutputHead, state: Prefill, iters: list[int], lr: float, autograd: bool = False
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Optimise one delta per sample for max(iters) steps; return delta after each requested step count
    ({iters: [B, 1, H] fp32}) and the per-sample loss at every step count 0..max(iters) ([B, max+1]).
    `autograd` forces the general path (the reference's way; for comparisons)."""
    batch, _, hidden_size = state.hidden.shape
    snapshots, trace = {}, []
    # Evaluation loops run under inference mode; AdamW's updates (and autograd, general path) need out of it.
    # Autocast (precision bf16-mixed) would run W·delta and Wᵀ·g in bf16: the maths on delta stays fp32/fp64.
    with torch.inference_mode(False), torch.autocast(state.hidden.device.type, enabled=False):
        if head.linear and not autograd:
            loss_and_gradient = CachedLogitLoss(head, state)
        else:  # autograd cannot use inference-mode tensors: clone them out
            state = Prefill(*(t.clone() for t in (state.hidden, state.logits, state.targets, state.weights)), None)
            loss_and_gradient = HeadAutogradLoss(head, state)
        delta = torch.zeros(batch, 1, hidden_size, dtype=torch.float32, device=state.hidden.device)
        optimizer = torch.optim.AdamW([delta], lr=lr, weight_decay=1e-8, eps=1e-5)
        for step in range(max(iters) + 1):
            if step in iters:
                snapshots[step] = delta.clone()
            last = step == max(iters)
            losses, gradient = loss_and_gradient(delta, with_gradient=not last)
            trace.append(losses)
            if last:
                break
            delta.grad = gradient
            optimizer.step()
    return snapshots, torch.stack(trace, dim=1)


def cache_copy(cache: DynamicCache) -> DynamicCache:
    """An independent copy of a prefill cache (generation appends to the cache it is given)."""
    return copy.deepcopy(cache)
