"""The CLI of Lightning's subcommands (`fit`, `validate`, `test`, `predict`): ReasoningLabCLI, its parser and
bad-input rules, and the configuration it resolves (`resolve_config`, which `scaffold` writes into its runs).

Imported by cli.py (the entry point) and by commands that validate a config exactly as `fit` would.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError, Namespace
from lightning import LightningModule

from callbacks.checkpoints import SafeCheckpoints
from callbacks.export import EpochExport
from callbacks.planning_report import PlanningReport
from callbacks.run_summary import RunSummary
from callbacks.samples import SampleWriter
from callbacks.slurm import SlurmRequeue
from commands.cli_internals import HookedLightningCLI, option_names
from core.checkpoint_file import read_checkpoint
from core.config_errors import cause_of_type, one_line, parse_error_line
from core.errors import ReasoningLabError, UserInputError
from core.io import check_output_folder
from core.run_directory import (
    check_new_run,
    check_run_names,
    is_launching_process,
    newest_checkpoint,
    newest_run,
    removed_when_unused,
    run_folder,
)
from datamodules.reasoning import ReasoningDataModule
from models.loading import ModelSpec
from models.trust import with_user_backbone
from tasks.planning import PlanningSpec

RUNS_DIR = "runs"
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")  # --ckpt_path values Lightning resolves itself
FINETUNER = "lightning_modules.finetune.CausalLMFineTuner"
CHECKPOINT_CLASSES = {FINETUNER: ("backbone", "mode", "lora", "planning")}
"""The classes a `--ckpt_path` checkpoint may name, and the settings each saves (its `save_hyperparameters`)."""


class ReasoningLabCLI(HookedLightningCLI):
    """LightningCLI with the project's links and its bad-input rules: one-line parse errors, `--ckpt_path`
    read safely before Lightning touches it, no new fit mixed into an existing run directory, and no empty
    run directory left by a run that bad input stopped."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EpochExport, "export")
        parser.add_argument(
            "--overwrite_run",
            type=bool,
            default=False,
            help="fit: start over in an existing run directory named by trainer.logger.init_args.version "
            "(its contents are removed first) instead of refusing it. Never saved as true in config.yaml.",
        )
        # The model owns model loading (tokenizer included); the datamodule tokenises with it.
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        # Planning tokens are added to the tokenizer by the model; the datamodule writes them into the targets.
        parser.link_arguments("model", "data.planning", compute_fn=planning_of, apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        """Parse errors as one line (the key at fault and its valid neighbours), not jsonargparse's tree."""
        self.argv = [] if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise UserInputError(parse_error_line(error, self.argv, option_names(parser, self.argv))) from None

    def apply_checkpoint_settings(self) -> None:
        """`--ckpt_path`: resolve `last`, read the file safely (one line when it is missing, truncated or holds
        pickled objects), refuse model settings on the command line that the checkpoint's would replace, and
        re-apply the checkpoint's hyper-parameters over the config (as LightningCLI does)."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if config.get("ckpt_path") == "last":
            resolve_last_checkpoint(config)
        path = config.get("ckpt_path")
        if not path or path in LIGHTNING_CHECKPOINT_NAMES:
            return
        hparams = dict(read_checkpoint(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        hparams = trusted_settings(hparams, config.model, path)
        refuse_dropped_overrides(self.argv, config.model, hparams, path)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except ArgumentError as error:
            message = one_line(str(error))
            raise UserInputError(f"checkpoint '{path}': its model settings do not parse: {message}") from None

    def before_instantiate_classes(self) -> None:
        """Before anything is built: output folders that can be made, plain run names, and no new fit mixed
        into an existing run (`core.run_directory`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, logger = config.trainer, config.trainer.logger
        if trainer.default_root_dir:
            check_output_folder(trainer.default_root_dir, "trainer.default_root_dir")
        args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if args:
            check_run_names(args.get("name"), args.get("version"))
            if args.get("save_dir"):
                check_output_folder(args.save_dir, "trainer.logger.init_args.save_dir")
        if self.subcommand == "fit" and args and args.get("version") is not None:
            check_new_run(
                run_folder(args.save_dir, args.get("name"), args.version),
                Path(args.save_dir or "."),
                Path(trainer.default_root_dir or os.getcwd()),
                resuming=bool(config.get("ckpt_path")),
                overwrite=bool(config.get("overwrite_run")),
            )
        config.overwrite_run = False  # config.yaml never tells a later run to overwrite

    def run_subcommand(self, subcommand: str) -> None:
        """Run; when bad input stops it, remove the run directory it created if that holds nothing yet."""
        run_dir = logger_run_dir(self.trainer) if is_launching_process() else None
        with removed_when_unused(run_dir, is_bad_input):
            super().run_subcommand(subcommand)


class ConfigResolver(ReasoningLabCLI):
    """Parses and validates a configuration without instantiating anything (no model is loaded, no seed set)."""

    def seed(self) -> None:
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
            "callbacks": [RunSummary(), SampleWriter(), PlanningReport(), SlurmRequeue(), SafeCheckpoints()],
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # parse errors become one line (ReasoningLabCLI.parse_arguments)
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def trusted_settings(hparams: dict, model: Namespace, path: str) -> dict:
    """A checkpoint's hyper-parameters as they may be re-applied over the config: its class only from
    `CHECKPOINT_CLASSES` and its settings only from that class's list (both checked before anything is imported:
    jsonargparse imports the modules that class paths name), the backbone's name, revision, remote-code and
    attention-kernel settings the user's (`models.trust`)."""
    class_path = hparams.get("_class_path", FINETUNER)
    if class_path not in CHECKPOINT_CLASSES:
        raise UserInputError(
            f"checkpoint '{path}': it names the class {str(class_path)[:100]!r}; checkpoints may only name "
            f"{', '.join(CHECKPOINT_CLASSES)} (nothing was imported)"
        )
    unknown = sorted(str(key) for key in hparams if key != "_class_path" and key not in CHECKPOINT_CLASSES[class_path])
    if unknown:
        raise UserInputError(
            f"checkpoint '{path}': unexpected model settings {unknown[:5]}; a checkpoint of cli.py fit records only "
            f"{', '.join(CHECKPOINT_CLASSES[class_path])}"
        )
    if "backbone" in hparams:
        user = model.get("init_args", Namespace()).get("backbone") if isinstance(model, Namespace) else None
        hparams["backbone"] = with_user_backbone(hparams["backbone"], user or ModelSpec(), f"checkpoint '{path}'")
    return hparams


def refuse_dropped_overrides(argv: list[str], model: Namespace, hparams: dict, path: str) -> None:
    """`--model.X value` on the command line that differs from the checkpoint's X: LightningCLI would silently
    replace it by the checkpoint's value, so it is refused in one line."""
    for arg in argv:
        if not arg.startswith("--model."):
            continue
        key = arg[2:].split("=", 1)[0]
        parts = key.split(".")[1:]
        parts = parts[1:] if parts[:1] == ["init_args"] else parts
        if not parts or parts[0] not in hparams:
            continue  # not a saved hyper-parameter (generation, rank_log...): it applies as given
        saved = hparams
        for part in parts:
            saved = saved.get(part) if isinstance(saved, dict) else None
        given = plain(model.get("init_args", Namespace()).get(".".join(parts)))
        if given != plain(saved):
            raise UserInputError(
                f"--{key} {given!r}: the checkpoint '{path}' was trained with {'.'.join(parts)} = {plain(saved)!r}, "
                "and --ckpt_path rebuilds the model with the checkpoint's settings; drop the option"
            )


def plain(value: object) -> object:
    """`value` as plain Python data (namespaces and dataclasses as dicts, tuples as lists) for comparisons."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def resolve_last_checkpoint(config: Namespace) -> None:
    """`--ckpt_path last`: resume the newest run of this experiment in place (same run directory), from its newest
    complete checkpoint (`core.run_directory`)."""
    logger = config.trainer.logger
    if not isinstance(logger, Namespace) or "init_args" not in logger:
        raise UserInputError("--ckpt_path last needs a TensorBoard logger in the config (trainer.logger)")
    run_dir = newest_run(Path(logger.init_args.save_dir) / str(logger.init_args.name or ""))
    path, step = newest_checkpoint(run_dir / "checkpoints")
    logger.init_args.version = run_dir.name
    config.ckpt_path = str(path)
    print(f"Resuming {config.ckpt_path} (step {step})", flush=True)


def logger_run_dir(trainer) -> Path | None:
    """The run directory the trainer's logger writes to (None without a logger that has one)."""
    logger = trainer.logger
    return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None


def is_bad_input(error: BaseException) -> bool:
    """Whether `error` is (or wraps) bad user input: a run it stops has produced nothing worth keeping."""
    return isinstance(cause_of_type(error, ReasoningLabError), UserInputError)


def planning_of(model: LightningModule) -> PlanningSpec | None:
    """The model's planning-token spec (None for models without one, e.g. the SLOT evaluator)."""
    return getattr(model, "planning", None)
