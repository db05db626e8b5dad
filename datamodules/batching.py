"""Batching: length-grouped batch sampling, and the collate function."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from core.tensors import pad_sequences


class EpochSeededRandomSampler(RandomSampler):
    """A random permutation that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, data_source: Sequence, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar length: the sampler's order is cut into windows of `group_size` batches,
    each window sorted by length and cut into batches, and the batches of a window shuffled.

    It takes any index sampler, so Lightning can swap in a DistributedSampler under DDP.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int] = (),
        group_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        # Seeded from the sampler's own order, so the batch order follows its epoch (and rank) exactly.
        generator = torch.Generator().manual_seed(self.seed + sum(order[:16]))
        window = self.batch_size * self.group_size
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__, reverse=True)
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            if self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
            for index in torch.randperm(len(batches), generator=generator).tolist():
                yield batches[index]


class ResumingDataLoader(DataLoader):
    """A DataLoader that asks `batches_done()`, when an epoch's first batch is requested, how many batches of
    that epoch were already trained, and skips them: a run resumed from a checkpoint taken mid-epoch (e.g. at
    SLURM's time limit) trains on exactly the batches it had not seen. (Asked at the first batch, not when
    the iterator is made: Lightning makes it before it restores the loop state.)"""

    def __init__(self, *args, batches_done: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        return self._resumed(iterator) if self.batches_done else iterator

    def _resumed(self, iterator: Iterator) -> Iterator:
        for _ in range(self.batches_done()):
            next(iterator, None)
        yield from iterator


def collate(features: list[dict], pad_id: int, answer_format: str | None = None, scorer: object | None = None) -> dict:
    """Right-padded `input_ids/attention_mask/labels` for the loss. Evaluation batches (`answer_format`
    given) also carry left-padded `prompt_ids/prompt_mask` to generate from, the examples' ids, questions,
    gold answers and positions in the evaluation set, the name of the answer format that scores them, and the
    `scorer` of a source that scores its own questions (lm-eval tasks)."""
    batch = {
        "input_ids": pad_sequences([f["input_ids"] for f in features], pad_id),
        "attention_mask": pad_sequences([[1] * len(f["input_ids"]) for f in features], 0),
        "labels": pad_sequences([f["labels"] for f in features], -100),
    }
    if answer_format is not None:
        batch["answer_format"] = answer_format
        if scorer is not None:
            batch["scorer"] = scorer
        batch["prompt_ids"] = pad_sequences([f["prompt_ids"] for f in features], pad_id, side="left")
        batch["prompt_mask"] = pad_sequences([[1] * len(f["prompt_ids"]) for f in features], 0, side="left")
        for key in ("id", "question", "answer"):
            batch[key] = [f[key] for f in features]
        if "position" in features[0]:
            batch["position"] = [f["position"] for f in features]
    return batch


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` in as few rows of at most `capacity` tokens as it finds
    (longest first, each into the first row with room; ties keep their order). Deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([]), room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_collate(features: list[dict], pad_id: int, capacity: int) -> dict:
    """The examples of a batch packed into as few rows of at most `capacity` tokens as fit (`pack_rows`), with
    `position_ids` restarting at 0 for every example (the model derives from them that no attention crosses
    examples) and no label on an example's first token (nothing in its own example predicts it). Rows are padded
    to the longest row only; padding is its own segment, labelled -100. `attention_mask` marks the real tokens
    (for counting: the model is given the positions instead)."""
    packed = []
    for row in pack_rows([len(f["input_ids"]) for f in features], max(capacity, 1)):
        ids, labels, positions = [], [], []
        for index in row:
            example = features[index]
            ids += example["input_ids"]
            labels += [-100, *example["labels"][1:]]
            positions += range(len(example["input_ids"]))
        packed.append((ids, labels, positions))
    width = max(len(ids) for ids, _, _ in packed)
    return {
        "input_ids": pad_sequences([ids for ids, _, _ in packed], pad_id),
        "attention_mask": pad_sequences([[1] * len(ids) for ids, _, _ in packed], 0),
        "labels": pad_sequences([labels for _, labels, _ in packed], -100),
        "position_ids": torch.tensor([positions + list(range(width - len(positions))) for _, _, positions in packed]),
    }
