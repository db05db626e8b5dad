"""lm-evaluation-harness tasks as a data source (`data.task: lm_eval`): lm-eval renders, we generate, lm-eval scores.

Each question's prompt, stop strings and generation length are the request lm-eval itself builds for the doc
(`Task.build_all_requests`: its TaskManager, few-shot sampler, delimiters, chat template and system instruction);
the prompt is tokenised as lm-eval's HF model tokenises it. Every completion is scored with the task's own filter
ensembles and metric (`FilterEnsemble.apply`, `Task.process_results`), majority-vote / take-first-k chains
included. Generation (engine, decoding rule, repeats, rank logs) stays the project's. lm-eval is an optional
dependency (`pip install -e '.[lm_eval]'`), imported only when such a task is used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from core.errors import UserInputError

LM_EVAL_TASK = "lm_eval"
"""The `data.task` value that reads questions from an lm-eval task."""


@dataclass
class LmEvalSpec:
    """Which lm-eval task, and how lm-eval renders its prompts (the options of lm-eval's own command line)."""

    task: str | None = None
    """The lm-eval task name (e.g. gsm8k_fewshot from configs/lm_eval, or any of lm-eval's own tasks)."""
    include_path: str | None = None
    """A folder of task YAMLs to index besides lm-eval's own (lm_eval --include_path)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None = the task's own num_fewshot (lm_eval --num_fewshot)."""
    apply_chat_template: bool = False
    """Render the prompt with the tokenizer's chat template (lm_eval --apply_chat_template)."""
    fewshot_as_multiturn: bool | None = None
    """Few-shot examples as separate chat turns; None = as lm-eval's command line: on with the chat template."""
    system_instruction: str | None = None
    """A system instruction before the prompt (lm_eval --system_instruction)."""
    add_bos_token: bool | None = None
    """As lm-eval's HF model argument: None = the tokenizer's default (nothing added to text starting with BOS)."""
    max_gen_toks: int | None = None
    """Longest completion in tokens instead of the task's (lm_eval --gen_kwargs max_gen_toks=N); the task's
    length and stop strings replace model.generation's max_new_tokens and stop."""

    def __post_init__(self) -> None:
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserInputError(f"data.lm_eval.num_fewshot must be >= 0 or null, got {self.num_fewshot}")
        if self.max_gen_toks is not None and self.max_gen_toks < 1:
            raise UserInputError(f"data.lm_eval.max_gen_toks must be >= 1 or null, got {self.max_gen_toks}")


@dataclass(frozen=True)
class LmEvalRequest:
    """One doc's request as lm-eval builds it."""

    id: str
    index: int
    """The doc's index in the task's evaluation split."""
    question: str
    """The doc's own text (doc_to_text, without the few-shot context)."""
    context: str
    """The full prompt text lm-eval sends."""
    target: str
    """The gold answer (doc_to_target)."""
    target_delimiter: str


def _import_lm_eval():
    try:
        import lm_eval.api.metrics
        import lm_eval.defaults
        import lm_eval.tasks
    except ImportError:
        raise UserInputError(
            "data.task lm_eval needs lm-evaluation-harness, which is not installed: pip install -e '.[lm_eval]'"
        ) from None
    return lm_eval


def load_task(spec: LmEvalSpec):
    """The lm-eval task object named by `spec` (dataset loaded), or one clear line saying why not."""
    lm_eval = _import_lm_eval()
    if not spec.task:
        raise UserInputError("data.task lm_eval needs data.lm_eval.task (an lm-eval task name)")
    include_path = spec.include_path
    if include_path is not None and not Path(include_path).is_dir():
        raise UserInputError(f"data.lm_eval.include_path: no folder '{include_path}'")
    # Index the include path alone first (seconds); lm-eval's own ~15k task files only when the task is not there.
    manager = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=include_path is None)
    if spec.task not in manager.all_tasks and include_path is not None:
        manager = lm_eval.tasks.TaskManager(include_path=include_path)
    if spec.task not in manager.all_tasks:
        where = f"lm-eval's tasks and {include_path}" if include_path else "lm-eval's tasks; data.lm_eval.include_path?"
        raise UserInputError(f"data.lm_eval.task: no task '{spec.task}' (searched {where})")
    try:
        tasks = lm_eval.tasks.get_task_dict([spec.task], manager)
    except Exception as error:  # noqa: BLE001 - datasets / lm-eval raise many types; report one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserInputError(
            f"data.lm_eval.task '{spec.task}': could not load its dataset or config ({type(error).__name__}: "
            f"{message}); relative data_files are read from the working directory ({Path.cwd()})"
        ) from None
    task = tasks[spec.task]
    if not hasattr(task, "build_all_requests"):
        raise UserInputError(f"data.lm_eval.task '{spec.task}' is a group of tasks: name one task")
    if task.OUTPUT_TYPE != "generate_until":
        raise UserInputError(
            f"data.lm_eval.task '{spec.task}' is a {task.OUTPUT_TYPE} task: only generate_until tasks generate"
        )
    mean = lm_eval.api.metrics.mean
    if other := sorted(name for name, fn in task.aggregation().items() if fn is not mean):
        raise UserInputError(
            f"data.lm_eval.task '{spec.task}': metrics {other} are not averaged over questions (only mean is supported)"
        )
    # as lm-eval's simple_evaluate: a task's explicit 0 shots stay 0, none given means 0; its few-shot seed
    if spec.num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=lm_eval.defaults.DEFAULT_OTHER_SEED)
    return task


def render_chat(tokenizer, history: list[dict], add_generation_prompt: bool = True) -> str:
    """A chat history rendered as lm-eval's HF model renders it (without the system turn if the template
    refuses one)."""
    import jinja2

    def apply(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    try:
        return apply(history)
    except jinja2.exceptions.TemplateError:
        return apply([message for message in history if message["role"] != "system"])


def build_requests(task, spec: LmEvalSpec, indices: Sequence[int], tokenizer=None) -> list[LmEvalRequest]:
    """lm-eval's requests for the docs at `indices` (ascending), built by the task itself."""
    chat = spec.apply_chat_template
    if chat and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise UserInputError("data.lm_eval.apply_chat_template: the tokenizer has no chat template")
    multiturn = chat if spec.fewshot_as_multiturn is None else spec.fewshot_as_multiturn
    indices = sorted(indices)
    task.build_all_requests(
        samples=indices,
        system_instruction=spec.system_instruction,
        apply_chat_template=chat,
        fewshot_as_multiturn=multiturn,
        chat_template=partial(render_chat, tokenizer) if chat else None,
        tokenizer_name=getattr(tokenizer, "name_or_path", "") if chat else "",
    )
    split = task.config.test_split or task.config.validation_split
    requests = []
    for instance in task.instances:  # with `samples`, doc_id counts the selected docs (lm-eval's evaluator maps it)
        index = indices[instance.doc_id]
        text = task.doc_to_text(instance.doc)
        requests.append(
            LmEvalRequest(
                id=f"{split}-{index}",
                index=index,
                question=text if isinstance(text, str) else instance.arguments[0],
                context=instance.arguments[0],
                target=str(task.doc_to_target(instance.doc)),
                target_delimiter=task.config.target_delimiter,
            )
        )
    return requests


def generation_settings(task, max_gen_toks: int | None = None) -> tuple[list[str], int]:
    """(stop strings, max new tokens) of the task's requests, normalised as lm-eval's models do (`max_gen_toks`
    first, as a --gen_kwargs override would)."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = dict(task.instances[0].arguments[1])
    if max_gen_toks is not None:
        kwargs["max_gen_toks"] = max_gen_toks
    kwargs = normalize_gen_kwargs(kwargs)  # default 256 tokens, as lm-eval's models
    until = kwargs.get("until") or []
    return ([until] if isinstance(until, str) else list(until)), int(kwargs["max_gen_toks"])


def encode_context(tokenizer, text: str, add_bos_token: bool | None = None) -> list[int]:
    """Token ids of a prompt as lm-eval's HF model encodes it: special tokens as the tokenizer adds them, none
    when the text already starts with BOS, or as `add_bos_token` says."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return tokenizer(text, add_special_tokens=False).input_ids
    if add_bos_token is not None:
        return tokenizer(text, add_special_tokens=add_bos_token).input_ids
    return tokenizer(text).input_ids


class LmEvalScorer:
    """Scores completions of an lm-eval task's docs with the task's own filters and metric.

    Per sample: the first filter ensemble that needs one sample (e.g. regex + take_first) gives the prediction
    (its fallback, e.g. "[invalid]", included: such a sample votes for it) and the task's first metric gives
    correctness (full credit). Per question: every filter ensemble over all samples, as lm-eval reports them;
    ensembles that take the first k samples are skipped when there are fewer than k.
    """

    def __init__(self, task, requests: list[LmEvalRequest], max_gen_toks: int | None = None) -> None:
        from lm_eval.api.registry import get_filter

        self.task = task
        self.name = task.config.task
        self.instances = {request.id: instance for request, instance in zip(requests, task.instances, strict=True)}
        self.stop, self.max_new_tokens = generation_settings(task, max_gen_toks)
        take_k = get_filter("take_first_k")
        self.ensembles = [
            (
                ensemble,
                max(
                    (f.keywords.get("k", 1) for f in ensemble.filters if isinstance(f, partial) and f.func is take_k),
                    default=1,
                ),
            )
            for ensemble in task._filters
        ]
        single = [ensemble for ensemble, needs in self.ensembles if needs == 1]
        if not single:
            raise UserInputError(f"data.lm_eval.task '{self.name}': no filter ensemble scores a single sample")
        self.sample_ensemble = single[0]
        self.metric = next(iter(task._metric_fn_list))

    def _apply(self, ensemble, question_id: str, samples: list[str]) -> dict[str, float]:
        instance = copy.copy(self.instances[question_id])
        instance.resps, instance.filtered_resps = list(samples), {}
        ensemble.apply([instance])
        results = self.task.process_results(instance.doc, [instance.filtered_resps[ensemble.name]])
        return {"filtered": instance.filtered_resps[ensemble.name], **{k: float(v) for k, v in results.items()}}

    def score(self, question_id: str, samples: list[str]) -> tuple[list[str], list[bool], dict[str, dict]]:
        """(each sample's filtered answer, each sample's correctness, {filter: {metric: value}} over all samples)."""
        predictions, correct = [], []
        for sample in samples:
            scored = self._apply(self.sample_ensemble, question_id, [sample])
            filtered = scored.pop("filtered")
            predictions.append(filtered if isinstance(filtered, str) else str(filtered))
            correct.append(scored[self.metric] >= 1.0)
        per_filter = {}
        for ensemble, needs in self.ensembles:
            if needs <= len(samples):
                scored = self._apply(ensemble, question_id, samples)
                scored.pop("filtered")
                per_filter[ensemble.name] = scored
        return predictions, correct, per_filter


def question_count(task) -> int:
    """How many docs the task's evaluation split has."""
    return len(task.eval_docs)
