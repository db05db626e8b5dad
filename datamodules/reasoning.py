"""The LightningDataModule: task -> examples -> prompt/target token ids -> length-grouped batches."""

from __future__ import annotations

import logging
import random
import warnings
from functools import partial

import datasets
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from core.errors import UserInputError
from datamodules.batching import (
    EpochSeededRandomSampler,
    LengthGroupedBatchSampler,
    ResumingDataLoader,
    collate,
    pack_collate,
)
from models.loading import ModelSpec, cache_dir, load_model, load_tokenizer
from tasks.examples import Example, get_task, load_examples, seeded_subset
from tasks.lm_eval_source import (
    LM_EVAL_TASK,
    LmEvalScorer,
    LmEvalSpec,
    build_requests,
    encode_context,
    load_task,
    question_count,
)
from tasks.planning import CLUSTER_METHODS, PlanningSpec, arithmetic_types, split_steps, tagged_steps
from tasks.planning_upstream import TASKS as UPSTREAM_TASKS
from tasks.planning_upstream import render_cot, upstream_solution
from tasks.prompts import PromptFormatter, PromptSpec
from tasks.scoring import get_answer_format
from tasks.step_types import StepTyper, annotate_steps

log = logging.getLogger(__name__)
PROTOCOLS = ("project", "planning_tokens")
# Lightning warns that a mid-epoch resume repeats data unless the loader is stateful; train_dataloader()
# skips the batches already trained instead (ResumingDataLoader), which tests/test_slurm.py checks bit for bit.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def first_ids(ids: list[str], shown: int = 5) -> str:
    """' (ids a, b, c and 7 more)': the first few example ids of a warning ('' for none)."""
    if not ids:
        return ""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f" (ids {', '.join(ids[:shown])}{more})"


class ReasoningDataModule(LightningDataModule):
    """Question/solution data of one task, tokenised with the model's tokenizer.

    Args:
        task: gsm8k | math | aqua | instruction ({"instruction","input","output"[,"answer"]} records) |
            strategyqa ({"question","steps","answer"} records, steps tagged [rag]/[memory]/[reason]) |
            commonsenseqa / truthfulqa_mc1 (the same with "choices" and an answer letter, A-E / A-N) |
            lm_eval (an lm-evaluation-harness task, named in `lm_eval`; test / predict only: lm-eval renders each
            prompt, its stop strings and length, and scores the completions with the task's filters and metric).
        lm_eval: the lm-eval task and how lm-eval renders it (task lm_eval only).
        train_path: training data, a .json/.jsonl file or a hub id; None = the task's bundled train split.
        test_path: test data (test and predict), likewise; None = the task's bundled test split.
        hub_subset: the hub dataset's configuration name (e.g. "main" for openai/gsm8k).
        answer_format: how answers are scored (gsm8k, math, aqua, letters_a_e, letters_a_n, boolean,
            planning_strict_gsm8k, ...); None = the task's own.
        protocol: project | planning_tokens: how questions, solution steps, targets and gold answers are written.
            planning_tokens renders them as the planning-tokens code does (tasks/planning_upstream.py: gsm8k, math,
            aqua; a record it skips is dropped with a warning); project keeps the task's own text (the solution
            as the target of a plain chain of thought, steps split by `tasks.planning.split_steps`).
        prompt: how a question becomes a prompt (plain or chat template, system prompt).
        max_length: longest training sequence in tokens (prompt + response); longer ones are truncated.
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size per device (generation batches).
        val_size: validation questions held out of the training data (seeded, without replacement).
        train_limit: use only this many training examples (seeded subset without replacement).
        test_limit: evaluate only this many test questions (seeded subset without replacement).
        group_by_length: batch training examples of similar length together (less padding).
        packing: pack the `batch_size` examples of each training batch into as few rows of `pack_length` tokens
            as fit, each example with its own positions and no attention across examples: the same examples
            and the same loss per step as without packing, with no padding computed (one row) or little.
        pack_length: tokens per packed row; default `batch_size` x `max_length`: the whole batch in one row.
        seed: seed of every subset and of the shuffling.
        num_workers: DataLoader worker processes.
        tokenizer: the model's tokenizer; `cli.py` links it from the model.
        planning: the model's planning tokens, written into the targets; `cli.py` links it from the model.
    """

    def __init__(
        self,
        task: str = "gsm8k",
        train_path: str | None = None,
        test_path: str | None = None,
        hub_subset: str | None = None,
        answer_format: str | None = None,
        protocol: str = "project",
        prompt: PromptSpec | None = None,
        max_length: int = 512,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        val_size: int = 64,
        train_limit: int | None = None,
        test_limit: int | None = None,
        group_by_length: bool = True,
        packing: bool = False,
        pack_length: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        planning: PlanningSpec | None = None,
        lm_eval: LmEvalSpec | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "planning"])
        self.lm_eval = lm_eval if task == LM_EVAL_TASK else None
        if task == LM_EVAL_TASK:
            for name, value in (("prompt", prompt), ("answer_format", answer_format), ("test_path", test_path)):
                if value is not None:
                    raise UserInputError(f"data.{name} does not apply to data.task lm_eval: the lm-eval task sets it")
            self.lm_eval = lm_eval or LmEvalSpec()
        elif lm_eval is not None:
            raise UserInputError(f"data.lm_eval applies to data.task lm_eval only (data.task is {task})")
        self.task = None if self.lm_eval else get_task(task)
        self.answer_format = None if self.lm_eval else get_answer_format(answer_format or self.task.answer_format)
        self.scorer: LmEvalScorer | None = None
        self.prompt = prompt or PromptSpec()
        if protocol not in PROTOCOLS:
            raise UserInputError(f"data.protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
        if protocol == "planning_tokens" and (self.task is None or self.task.name not in UPSTREAM_TASKS):
            raise UserInputError(
                f"data.protocol=planning_tokens supports the tasks {', '.join(UPSTREAM_TASKS)}, not '{task}'"
            )
        for name in ("max_length", "batch_size", "eval_batch_size", "pack_length"):
            if getattr(self.hparams, name) is not None and getattr(self.hparams, name) < 1:
                raise UserInputError(f"data.{name} must be >= 1, got {getattr(self.hparams, name)}")
        self.tokenizer = tokenizer
        self.planning = planning or PlanningSpec()
        self.source = ""  # the file or hub id of the split being encoded, for error messages
        self.splits: dict[str, datasets.Dataset] = {}
        self.test_examples: list[Example] = []
        self.typer: StepTyper | None = None
        self.step_types: dict[str, list[int]] = {}
        """kmeans / vae: example id -> the type of each of its steps."""
        self.gold_types: dict[str, dict[str, dict[str, int]]] = {}
        """split -> example id -> planning key -> count in the planned gold solution (the token report)."""

    @property
    def formatter(self) -> PromptFormatter:
        if self.tokenizer is None:
            raise UserInputError("data.tokenizer is missing: the datamodule needs the model's tokenizer")
        return PromptFormatter(self.tokenizer, self.prompt)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate") and self.lm_eval is not None:
            raise UserInputError("data.task lm_eval is an evaluation source: use it with test or predict")
        if stage in ("test", "predict") and "test" not in self.splits and self.lm_eval is not None:
            self.test_examples = self._lm_eval_examples()
            self.splits["test"] = self._encode(self.test_examples, "test")
        if stage in ("fit", "validate") and "train" not in self.splits:
            train, val = self._train_and_val()
            self._type_steps({"train": train, "validation": val}, train)
            self.splits["train"] = self._encode(train, "train")
            self.splits["val"] = self._encode(val, "validation")
        if stage in ("test", "predict") and "test" not in self.splits:
            examples = load_examples(self.task, hp.test_path, "test", hp.hub_subset)
            examples = seeded_subset(examples, hp.test_limit, hp.seed)
            self.source = hp.test_path or str(self.task.bundled.get("test"))
            self.test_examples = examples
            if self.planning.method not in CLUSTER_METHODS:  # learned types: encoded once a checkpoint is restored
                self.splits["test"] = self._encode(examples, "test")

    def _lm_eval_examples(self) -> list[Example]:
        """The lm-eval task's questions (`test_limit`: the seeded subset of its docs), each with the prompt lm-eval
        builds for it; sets the scorer that scores their completions with the task's filters and metric."""
        task = load_task(self.lm_eval)
        indices = seeded_subset(range(question_count(task)), self.hparams.test_limit, self.hparams.seed)
        requests = build_requests(task, self.lm_eval, indices, self.tokenizer)
        self.scorer = LmEvalScorer(task, requests, self.lm_eval.max_gen_toks)
        self.source = f"lm-eval task {self.lm_eval.task}"
        return [Example(r.id, r.question, r.target_delimiter + r.target, r.target, prompt=r.context) for r in requests]

    def _train_and_val(self) -> tuple[list[Example], list[Example]]:
        """The training examples (after `train_limit`) and the held-out validation questions (seeded)."""
        hp = self.hparams
        examples = load_examples(self.task, hp.train_path, "train", hp.hub_subset)
        self.source = hp.train_path or str(self.task.bundled.get("train"))
        if len(examples) <= hp.val_size:
            raise UserInputError(f"data: {len(examples)} training examples cannot hold out val_size={hp.val_size}")
        order = random.Random(hp.seed).sample(range(len(examples)), len(examples))
        val, train = order[: hp.val_size], order[hp.val_size :]
        train = train[: hp.train_limit] if hp.train_limit else train
        return [examples[i] for i in train], [examples[i] for i in val]

    def _type_steps(self, splits: dict[str, list[Example]], train: list[Example] | None = None) -> None:
        """kmeans / vae: type every step of `splits` with the typer fitted on the training examples (fitted
        here, found in the cache, or restored from a checkpoint by `load_state_dict`)."""
        if self.planning.method not in CLUSTER_METHODS:
            return
        if self.typer is None and train is None:
            train = self._train_and_val()[0]
        solutions = {}  # id -> (question, steps, answer) of the examples the protocol keeps
        for example in [*(train or []), *(e for split in splits.values() for e in split)]:
            if (solution := self.solution(example)) is not None:
                solutions[example.id] = solution
        fit_on = [] if self.typer else [solutions[e.id][:2] for e in train or [] if e.id in solutions]
        items = {
            name: [(e.id, *solutions[e.id][:2]) for e in split if e.id in solutions] for name, split in splits.items()
        }
        # Under DDP rank 0 alone embeds, fits and writes the cache; the other ranks receive its typer and types.
        trainer = self.trainer
        strategy = trainer.strategy if trainer is not None and trainer.world_size > 1 else None
        result: tuple | str | None = None
        if strategy is None or strategy.is_global_zero:
            try:
                typer, types = annotate_steps(
                    self.planning,
                    fit_on,
                    items,
                    cache_dir() / "planning",
                    self._step_embedder,
                    self.hparams.seed,
                    self.typer,
                )
                result = (typer.tensors, types)
            except ValueError as error:  # every rank stops with rank 0's message
                result = f"model.planning ({self.planning.method}): {error}"
        if strategy is not None:
            result = strategy.broadcast(result, src=0)
        if isinstance(result, str):
            raise UserInputError(result)
        tensors, types = result
        self.typer = StepTyper(self.planning, tensors)
        for split_types in types.values():
            self.step_types.update(split_types)

    def _step_embedder(self) -> tuple:
        """The (model, tokenizer) whose hidden states embed reasoning steps for kmeans / vae step types."""
        spec = ModelSpec(name=self.planning.embedding_model or "")
        return load_model(spec).eval(), load_tokenizer(spec)

    def state_dict(self) -> dict:
        """The fitted step typer (kmeans / vae), saved in checkpoints so evaluation reuses it."""
        return {"planning_typer": self.typer.tensors} if self.typer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        tensors = state.get("planning_typer")
        if tensors is None or self.planning.method not in CLUSTER_METHODS:
            return
        if self.typer is not None and tensors.keys() == self.typer.tensors.keys():
            if all(torch.equal(tensors[key], self.typer.tensors[key]) for key in tensors):
                return
        self.typer = StepTyper(self.planning, tensors)  # restored after `setup`: encode again with it
        if "train" in self.splits:  # resumed fit: encode again with the checkpoint's typer
            del self.splits["train"], self.splits["val"]
            self.step_types.clear()
            self.setup("fit")

    def _encode(self, examples: list[Example], name: str) -> datasets.Dataset:
        """Tokenise; a response running past max_length is truncated. A prompt that alone reaches
        max_length drops a training/validation example (with a warning) but is an error at test time,
        where dropping questions would silently change the accuracy's denominator."""
        max_length, planning = self.hparams.max_length, self.planning
        rows, truncated, dropped, skipped = [], [], [], []
        self.gold_types[name] = {}
        for example in examples:
            if (solution := self.solution(example)) is None:
                skipped.append(example.id)
                continue
            question, _, answer = solution
            response = self.target(example, solution) if example.prompt is None else example.response
            self.gold_types[name][example.id] = dict(planning.count_types(response))
            input_ids, labels, prompt_ids = self._token_ids(example, question, response)
            if len(prompt_ids) >= max_length:
                if name == "test":
                    raise UserInputError(
                        f"data: the prompt of test example '{example.id}' has {len(prompt_ids)} tokens, "
                        f"data.max_length is {max_length}: raise max_length"
                    )
                dropped.append(example.id)
                continue
            if len(input_ids) > max_length:
                truncated.append(example.id)
            rows.append(
                {
                    "id": example.id,
                    "question": question,
                    "answer": answer,
                    "input_ids": input_ids[:max_length],
                    "labels": labels[:max_length],
                    "prompt_ids": prompt_ids,
                }
            )
        if truncated or dropped:
            log.warning(
                "%s: %d examples truncated to %d tokens%s, %d dropped (prompt alone too long)%s; "
                "raise data.max_length to keep them whole",
                name,
                len(truncated),
                max_length,
                first_ids(truncated),
                len(dropped),
                first_ids(dropped),
            )
        if skipped:
            log.warning(
                "%s: %d examples skipped as the planning-tokens code skips them%s",
                name,
                len(skipped),
                first_ids(skipped),
            )
        if not rows:
            raise UserInputError(f"data: no {name} examples fit data.max_length={max_length}")
        return datasets.Dataset.from_list(rows)

    def solution(self, example: Example) -> tuple[str, list[str], str] | None:
        """(question, solution steps, gold answer) under `data.protocol`; None for a record it skips. A source's own
        prompt (lm-eval) comes with its target and gold as the task gives them."""
        if example.prompt is not None:
            return example.question, [], example.answer or ""
        if self.hparams.protocol == "planning_tokens":
            solution = upstream_solution(self.task.name, example.record)
            return None if solution is None or (self.planning.active and not solution[1]) else solution
        answer = example.answer or self.answer_format.extract(example.response) or ""
        steps = [] if self.planning.method == "memory-reason" else split_steps(example.response, self.task.name)
        return example.question, steps, answer

    def _token_ids(self, example: Example, question: str, response: str) -> tuple[list[int], list[int], list[int]]:
        """(input_ids, labels, prompt_ids): prompt + response with the prompt masked out of the loss, and the
        prompt to generate from (ending with the planning prefix). A source's own prompt text (lm-eval) is encoded
        as lm-eval's HF model encodes it; the response follows it as it is."""
        prefix = self.planning.eval_prefix()
        if example.prompt is None:
            input_ids, labels = self.formatter.encode_example(question, response)
            return input_ids, labels, self.formatter.encode_prompt(question, prefix)
        tokenizer = self.tokenizer
        prompt_ids = encode_context(tokenizer, example.prompt, self.lm_eval.add_bos_token)
        response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
        return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids, prompt_ids + prefix_ids

    def target(self, example: Example, solution: tuple[str, list[str], str]) -> str:
        """The training target: the solution's steps behind their planning tokens then the answer line, or, without
        planning tokens, the plain chain of thought (the task's own solution text under the project protocol)."""
        _, steps, answer = solution
        upstream = self.hparams.protocol == "planning_tokens"
        if not self.planning.active:
            return render_cot(steps, answer) if upstream else example.response
        if self.planning.method == "memory-reason":
            steps, types = tagged_steps(example.response, f"data: {self.source} example '{example.id}'")
        elif self.planning.method == "arithmetic":
            annotations = self.task.name not in ("math", "aqua")  # upstream reads <<...>> spans on GSM8K, not there
            types = [arithmetic_types(step, self.planning.operators, annotations) for step in steps]
        else:  # kmeans / vae: typed in `_type_steps`
            types = [[str(label)] for label in self.step_types[example.id]]
        return self.planning.render(steps, types, answer)

    def train_dataloader(self) -> DataLoader:
        dataset, hp = self.splits["train"], self.hparams
        sampler = EpochSeededRandomSampler(dataset, seed=hp.seed)
        capacity = hp.pack_length or hp.batch_size * hp.max_length
        loader_args = {
            "collate_fn": (
                partial(pack_collate, pad_id=self.tokenizer.pad_token_id, capacity=capacity)
                if hp.packing
                else self._collate(with_prompts=False)
            ),
            "num_workers": hp.num_workers,
            "batches_done": self._batches_trained_in_resumed_epoch,
            # Iterators draw their base seed from this generator, not from the global RNG that dropout uses
            # (a resumed run makes its iterator at a different point of the training than the original run).
            "generator": torch.Generator().manual_seed(hp.seed),
        }
        if not hp.group_by_length:
            return ResumingDataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, **loader_args)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        batches = LengthGroupedBatchSampler(sampler, hp.batch_size, drop_last=False, lengths=lengths, seed=hp.seed)
        return ResumingDataLoader(dataset, batch_sampler=batches, **loader_args)

    def _batches_trained_in_resumed_epoch(self) -> int:
        """While `fit` resumes a checkpoint saved mid-epoch, the batches of that epoch it already trained on."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        if split == "test" and "test" not in self.splits:  # kmeans / vae: the checkpoint's typer is restored now
            self._type_steps({"test": self.test_examples})
            self.splits["test"] = self._encode(self.test_examples, "test")
        dataset = self.splits[split]
        prompt_lengths = [len(ids) for ids in dataset["prompt_ids"]]
        by_prompt_length = sorted(range(len(dataset)), key=lambda i: -prompt_lengths[i])
        ordered = dataset.select(by_prompt_length)  # similar prompt lengths share a batch: little left padding
        return DataLoader(
            ordered.add_column("position", list(range(len(ordered)))),  # the rows' order across processes
            batch_size=self.hparams.eval_batch_size,
            collate_fn=self._collate(with_prompts=True),
            num_workers=self.hparams.num_workers,
        )

    def _collate(self, with_prompts: bool):
        name = f"lm_eval:{self.lm_eval.task}" if self.lm_eval else self.answer_format.name
        return partial(
            collate,
            pad_id=self.tokenizer.pad_token_id,
            answer_format=name if with_prompts else None,
            scorer=self.scorer if with_prompts else None,
        )
