"""reasoning-lab's one entry point: `python cli.py {fit,validate,test,predict} --config CONFIG.yaml`.

Configs stack left to right (`--config configs/planning_gsm8k.yaml --config configs/presets/cpu_demo.yaml`)
and any key can be overridden on the command line (`--trainer.max_steps 10`). `--print_config` shows
the resolved configuration; `--help` documents every argument.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import logging
import re
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

from jsonargparse import Namespace, auto_cli
from lightning import LightningModule
from lightning.pytorch.cli import LightningCLI

from callbacks.export import EpochExport
from callbacks.planning_report import PlanningReport
from callbacks.run_summary import RunSummary
from callbacks.samples import SampleWriter
from callbacks.slurm import SlurmRequeue
from core.errors import ReasoningLabError, UserInputError
from datamodules.reasoning import ReasoningDataModule
from tasks.planning import PlanningSpec

RUNS_DIR = "runs"

# Companion commands beside Lightning's subcommands: name -> ("module:function", one-line description).
# The function's signature and docstring become the command's arguments and `--help` (jsonargparse).
COMMANDS: dict[str, tuple[str, str]] = {
    "scaffold": (
        "commands.scaffold:scaffold",
        "SLURM scripts for fine-tuning runs, their evaluations and base controls",
    ),
    "traces": ("commands.traces:traces", "top-k traces of a frozen teacher-forced pass over gold responses"),
    "calibrate": ("commands.calibrate:calibrate", "calibration grid, power-law fit and decoding configs from traces"),
    "analyze": ("commands.analyze:analyze", "rank logs merged with evaluation samples: accuracy vs rank"),
    "dynamics": ("commands.dynamics:dynamics", "likelihood dynamics of a sample pool over every checkpoint of a run"),
    "select": ("commands.select:select", "keep the highest / lowest / a random-likelihood answer per question"),
    "compare": ("commands.compare:compare", "one table across runs or arms: 95 % intervals, paired tests"),
}


class ReasoningLabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EpochExport, "export")
        # The model owns model loading (tokenizer included); the datamodule tokenises with it.
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        # Planning tokens are added to the tokenizer by the model; the datamodule writes them into the targets.
        parser.link_arguments("model", "data.planning", compute_fn=planning_of, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("ckpt_path") == "last":
            resolve_last_checkpoint(config)


def planning_of(model: LightningModule) -> PlanningSpec | None:
    """The model's planning-token spec (None for models without one, e.g. the SLOT evaluator)."""
    return getattr(model, "planning", None)


def resolve_last_checkpoint(config: Namespace) -> None:
    """`--ckpt_path last`: resume the newest run of this experiment in place (same run directory)."""
    logger = config.trainer.logger
    if not isinstance(logger, Namespace) or "init_args" not in logger:
        raise UserInputError("--ckpt_path last needs a TensorBoard logger in the config (trainer.logger)")
    experiment = Path(logger.init_args.save_dir) / str(logger.init_args.name or "")
    runs = sorted(
        (int(match.group(1)), path.parent.parent)
        for path in experiment.glob("version_*/checkpoints/last.ckpt")
        if (match := re.fullmatch(r"version_(\d+)", path.parent.parent.name))
    )
    if not runs:
        raise UserInputError(f"--ckpt_path last: no {experiment}/version_*/checkpoints/last.ckpt to resume")
    run_dir = runs[-1][1]
    logger.init_args.version = run_dir.name
    config.ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
    print(f"Resuming {config.ckpt_path}", flush=True)


class ConfigResolver(ReasoningLabCLI):
    """Parses and validates a configuration without instantiating anything (no model is loaded)."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def resolve_config(args: list[str]) -> tuple[str, Namespace]:
    """The configuration that `fit` would run with `args` (configs and overrides, no subcommand): as YAML
    text `python cli.py fit --config` takes, and as a namespace."""
    with warnings.catch_warnings():  # args are given on purpose while sys.argv holds the calling command's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        resolver = build_cli(args, run=False, cli_class=ConfigResolver)
    return resolver.parser.dump(resolver.config, skip_none=False), resolver.config


def build_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[ReasoningLabCLI] = ReasoningLabCLI
) -> ReasoningLabCLI:
    """Parse `args` (default: sys.argv), instantiate everything and, with `run`, run the subcommand."""
    return cli_class(
        LightningModule,
        ReasoningDataModule,
        subclass_mode_model=True,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": RUNS_DIR, "name": "default"},
            },
            "callbacks": [RunSummary(), SampleWriter(), PlanningReport(), SlurmRequeue()],
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def run_command(name: str, args: list[str]) -> None:
    """Run companion command `name` with its own arguments."""
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    auto_cli(function, args=positional_words(function, args), as_positional=False)


def positional_words(function: Callable, args: list[str]) -> list[str]:
    """Words before the first option fill the command's first parameter when it is a list:
    `compare A B --output_dir x` is `compare --inputs '["A", "B"]' --output_dir x`."""
    words = list(itertools.takewhile(lambda arg: not arg.startswith("-"), args))
    first = next(iter(inspect.signature(function).parameters), None)
    if not words or first is None or typing.get_origin(typing.get_type_hints(function).get(first)) is not list:
        return args
    return [f"--{first}", json.dumps(words), *args[len(words) :]]


def print_commands() -> None:
    print("companion commands (python cli.py COMMAND --help):")
    for name, (_, description) in COMMANDS.items():
        print(f"  {name:<12} {description}")
    print()


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] in COMMANDS:
            run_command(argv[0], argv[1:])
            return
        if argv[:1] in (["-h"], ["--help"]) and COMMANDS:
            print_commands()
        build_cli(args)
    except Exception as error:
        ours = our_error(error)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        sys.exit(2)


def our_error(error: BaseException | None) -> ReasoningLabError | None:
    """The ReasoningLabError behind `error` (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ReasoningLabError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
