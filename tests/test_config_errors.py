"""jsonargparse's real errors, made by a small parser of the CLI's shape, and the one line core/config_errors.py
makes of each. The line is built by matching jsonargparse's wording: a jsonargparse upgrade that rewords an
error fails here (the line falls back to the raw text), not in front of a user."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from jsonargparse import ArgumentError, ArgumentParser

from commands.cli_internals import option_names
from core.config_errors import cause_of_type, parse_error_line
from core.errors import ReasoningLabError, UserInputError


@dataclasses.dataclass
class Lora:
    rank: int = 8
    alpha: float = 16.0


DEFAULT_LORA = Lora()


class Model:
    """A model class given by class_path, with a nested dataclass argument."""

    def __init__(self, lora: Lora = DEFAULT_LORA, dropout: float = 0.1) -> None:
        self.lora, self.dropout = lora, dropout


MODEL = f"{__name__}.Model"


def cli_parser() -> ArgumentParser:
    """`fit` with a class-path model, an optional int and a group of a dataclass: the shapes of the CLI's."""
    fit = ArgumentParser(exit_on_error=False)
    fit.add_argument("--config", action="config")
    fit.add_argument("--model", type=Model)
    fit.add_argument("--max_steps", type=int | None, default=None)
    fit.add_class_arguments(Lora, "lora")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_subcommands().add_subcommand("fit", fit)
    return parser


def error_line(args: list[str]) -> str:
    parser = cli_parser()
    with pytest.raises(ArgumentError) as caught:
        parser.parse_args(args)
    return parse_error_line(caught.value, args, option_names(parser, args))


def yaml_file(folder: Path, text: str) -> str:
    path = folder / "config.yaml"
    path.write_text(text)
    return str(path)


MAX_STESP = (
    "unknown key 'max_stesp': did you mean 'max_steps'? "
    "(the top level takes: config, lora, max_steps, model, print_config)"
)
LORA_RNK = "unknown key 'model.init_args.lora.rnk': did you mean 'rank'? (model.init_args.lora takes: rank, alpha)"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--model", MODEL, "--model.init_args.lora.rnk", "8"], LORA_RNK),
        (
            ["fit", "--model", MODEL, "--model.init_args.dropoot", "0.2"],
            "unknown key 'model.init_args.dropoot': did you mean 'dropout'? (model.init_args takes: lora, dropout)",
        ),
        (["fit", "--max_stesp", "3"], MAX_STESP),
        (["fit", "--lora.rnk", "3"], "unknown key 'lora.rnk': did you mean 'rank'? (lora takes: alpha, rank)"),
        (["fit", "--max_steps", "x"], "max_steps: Expected a <class 'int'>"),
        (
            ["fit", "--model", MODEL, "--model.init_args.dropout", "high"],
            "model.init_args.dropout: Expected a <class 'float'>. Got value: high",
        ),
    ],
    ids=["class-nested-key", "class-key", "top-key", "group-key", "bad-type", "class-bad-type"],
)
def test_command_line_errors_are_one_line(args: list[str], expected: str) -> None:
    assert error_line(args) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"model:\n  class_path: {MODEL}\n  init_args:\n    lora: {{rnk: 2}}\n", LORA_RNK),
        ("max_stesp: 3\n", MAX_STESP),
        ("lora:\n  rnk: 2\n", "unknown key 'lora.rnk': did you mean 'rank'? (lora takes: alpha, rank)"),
    ],
    ids=["class-nested-key", "top-key", "group-key"],
)
def test_config_file_errors_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert error_line(["fit", "--config", yaml_file(tmp_path, text)]) == expected


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "max_steps: 1\n  lora: [\n")
    assert error_line(["fit", "--config", path]) == f"{path}:2:7: mapping values are not allowed in this context"


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert error_line(["fit", "--config", str(missing)]) == f"Parser key \"config\": File does not exist: '{missing}'"


def test_our_error_is_found_behind_the_errors_that_wrap_it() -> None:
    try:
        try:
            raise UserInputError("model: bad")
        except UserInputError as ours:
            raise ValueError("while instantiating") from ours
    except ValueError as wrapped:
        assert cause_of_type(wrapped, ReasoningLabError).args == ("model: bad",)
        assert cause_of_type(wrapped, KeyError) is None
