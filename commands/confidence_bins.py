"""`python cli.py confidence_bins RUN ... --output_dir DIR`: majority-voted accuracy vs k for the confidence bins
(upstream code 003's figure1.py).

Each RUN is one `test` run with `generation.decoding.confidence_bin_only` = b (sampling only at steps whose top-1
probability is in bin b, greedy elsewhere: configs/decoding/confidence_bin.yaml), usually ten, b = 1..10, on the
same questions with repeated samples. Its newest `samples/test_step<S>.jsonl` gives, per question, the answer
extracted from each sample and its correctness; the bin comes from the run's `config.yaml`. For k = 1..max_k,
maj@k of a question is the majority vote over its first k samples (the project's rule, as `test`'s maj@k: samples
without an answer do not vote, ties go to the answer seen first; the reference lets an unanswered sample vote
as a blank answer); the curve is its mean over the questions. Writes confidence_bins.json and
confidence_bins.png.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from commands.compare import sample_files
from core.errors import UserInputError
from core.io import atomic_path, write_json_atomic
from core.records import read_json_records
from evaluation.sampling_metrics import majority_vote


def bin_label(number: int) -> str:
    """The top-1 probability range of bin `number` as the decoding rule reads it (bin 1 = [0.0, 0.1))."""
    return f"[{(number - 1) / 10:.1f}, {number / 10:.1f}{']' if number == 10 else ')'}"


def run_bin(samples: Path) -> int:
    """The `confidence_bin_only` value in the config.yaml of the run that wrote `samples`."""
    run = samples.parent.parent if samples.parent.name == "samples" else samples.parent
    config_path = run / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        value = config["model"]["init_args"]["generation"]["decoding"]["confidence_bin_only"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise UserInputError(
            f"{config_path}: cannot read model.init_args.generation.decoding.confidence_bin_only ({error}); give "
            "runs made with configs/decoding/confidence_bin.yaml"
        ) from None
    if not isinstance(value, int) or not 1 <= value <= 10:
        raise UserInputError(f"{config_path}: confidence_bin_only is {value!r}; this figure needs a bin 1..10")
    return value


def question_samples(path: Path) -> dict[str, tuple[list[str | None], list[bool]]]:
    """Per question id: the answer extracted from each sample and whether each sample is correct."""
    rows, places = read_json_records(path)
    questions = {}
    for place, row in zip(places, rows, strict=True):
        try:
            predictions = row["predictions"] if "predictions" in row else [row["prediction"]]
            correct = row["samples_correct"] if "samples_correct" in row else [row["correct"]]
            if len(predictions) != len(correct) or not all(isinstance(flag, bool) for flag in correct):
                raise ValueError("predictions and samples_correct differ in length or hold non-booleans")
            questions[str(row["id"])] = (list(predictions), list(correct))
        except (KeyError, TypeError, ValueError) as error:
            raise UserInputError(f"{place}: not an evaluation sample row ({error})") from None
    return questions


def majority_curve(questions: dict[str, tuple[list[str | None], list[bool]]], max_k: int) -> list[float]:
    """Mean maj@k over the questions for k = 1..max_k."""
    return [
        sum(majority_vote(predictions[:k], correct[:k])[1] for predictions, correct in questions.values())
        / len(questions)
        for k in range(1, max_k + 1)
    ]


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(9, 5.5))
    colors = plt.cm.tab10.colors
    for entry in result["bins"]:
        label = f"bin {entry['bin']} {entry['label']} (n={entry['questions']})"
        axis.plot(result["k_values"], entry["accuracies"], color=colors[(entry["bin"] - 1) % 10], label=label, lw=2)
    axis.set_xlabel("number of samples (k)")
    axis.set_ylabel("majority-voted accuracy")
    axis.set_title("Majority-voted accuracy vs number of samples by confidence bin")
    axis.set_xlim(1, max(result["k_values"][-1], 2))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=150)
    plt.close(figure)


def confidence_bins(runs: list[str], output_dir: str, max_k: int | None = None) -> dict:
    """Majority-voted accuracy vs k for each confidence bin: confidence_bins.json and confidence_bins.png.

    Args:
        runs: one `test` run folder (or its samples/test_step<S>.jsonl) per confidence_bin_only value, each bin
            at most once, all on the same questions.
        output_dir: where confidence_bins.json and confidence_bins.png go.
        max_k: the largest k (default: the fewest samples any question has).
    """
    if not runs:
        raise UserInputError("confidence_bins: give the runs, one per confidence_bin_only value")
    by_bin: dict[int, tuple[Path, dict]] = {}
    for run in runs:
        files = sample_files(run, only_input=True)
        if len(files) != 1:
            raise UserInputError(f"{run}: holds SLOT arms, not one test run's samples")
        path = files[0][1]
        number = run_bin(path)
        if number in by_bin:
            raise UserInputError(f"{run}: confidence bin {number} is also the bin of {by_bin[number][0]}")
        by_bin[number] = (path, question_samples(path))
    reference_path, reference = next(iter(by_bin.values()))
    for path, questions in by_bin.values():
        if set(questions) != set(reference):
            only = sorted(set(questions) ^ set(reference))
            raise UserInputError(f"{path}: its questions differ from {reference_path}'s (e.g. id {only[0]!r})")
    fewest = min(len(correct) for _, questions in by_bin.values() for _, correct in questions.values())
    if max_k is not None and not 1 <= max_k <= fewest:
        raise UserInputError(f"confidence_bins: max_k must be in 1..{fewest} (the fewest samples of a question)")
    max_k = max_k or fewest
    result = {"k_values": list(range(1, max_k + 1)), "bins": []}
    for number in sorted(by_bin):
        path, questions = by_bin[number]
        entry = {"bin": number, "label": bin_label(number), "samples": str(path), "questions": len(questions)}
        result["bins"].append({**entry, "accuracies": majority_curve(questions, max_k)})
    out = Path(output_dir)
    write_json_atomic(out / "confidence_bins.json", result)
    plot(out / "confidence_bins.png", result)
    print(f"{'bin':<16}{'maj@1':>8}{f'maj@{max_k}':>10}  questions")
    for entry in result["bins"]:
        name = f"{entry['bin']} {entry['label']}"
        print(f"{name:<16}{entry['accuracies'][0]:>8.4f}{entry['accuracies'][-1]:>10.4f}  {entry['questions']}")
    print(f"Confidence-bin curves: {out}/confidence_bins.png, confidence_bins.json")
    return result
