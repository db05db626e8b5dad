"""reasoning-lab's one entry point: `python cli.py {fit,validate,test,predict} --config CONFIG.yaml`.

Configs stack left to right (`--config configs/planning_gsm8k.yaml --config configs/presets/cpu_demo.yaml`)
and any key can be overridden on the command line (`--trainer.max_steps 10`). `--print_config` shows
the resolved configuration; `--help` documents every argument.
"""

from __future__ import annotations

import os

import core.hub_kernels  # noqa: F401 - before bitsandbytes: no kernel code fetched from the hub
import core.quiet  # noqa: F401 - before any library that logs: drops known third-party noise (core/quiet.py)

# PyTorch's CPU allocator: tensors of 2 MB and more page-aligned, on transparent huge pages where the kernel allows
# (`madvise`). Read once, at torch's first allocation, so it is set before any import that loads torch. Measured by
# benchmarks/train_throughput.py: a CPU LoRA step peaks ~1 GB lower (glibc's heap fragments less); packed steps run
# as fast, unpacked ones ~13 % slower; generation is as fast. `THP_MEM_ALLOC_ENABLE=0` keeps PyTorch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import dataclasses
import errno
import importlib
import inspect
import itertools
import json
import logging
import re
import shutil
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

from jsonargparse import ArgumentError, Namespace, auto_cli
from lightning import LightningModule
from lightning.pytorch.cli import LightningCLI

from callbacks.checkpoints import SafeCheckpoints
from callbacks.export import EpochExport
from callbacks.planning_report import PlanningReport
from callbacks.run_summary import RunSummary
from callbacks.samples import SampleWriter
from callbacks.slurm import SlurmRequeue
from core.checkpoint_file import read_checkpoint
from core.config_errors import one_line, yaml_syntax_error
from core.errors import ReasoningLabError, UserInputError
from core.io import check_inside, check_name, check_output_folder, missing_folders, remove_unused_run
from datamodules.reasoning import ReasoningDataModule
from models.loading import ModelSpec
from models.trust import with_user_backbone
from tasks.planning import PlanningSpec

RUNS_DIR = "runs"
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")  # --ckpt_path values Lightning resolves itself
FINETUNER = "lightning_modules.finetune.CausalLMFineTuner"
CHECKPOINT_CLASSES = {FINETUNER: ("backbone", "mode", "lora", "planning")}
"""The classes a `--ckpt_path` checkpoint may name, and the settings each saves (its `save_hyperparameters`)."""

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
    "confidence_bins": (
        "commands.confidence_bins:confidence_bins",
        "majority-voted accuracy vs k for each confidence bin (one test run per confidence_bin_only value)",
    ),
    "dynamics": ("commands.dynamics:dynamics", "likelihood dynamics of a sample pool over every checkpoint of a run"),
    "select": ("commands.select:select", "keep the highest / lowest / a random-likelihood answer per question"),
    "pool": ("commands.pool:pool", "a dynamics pool with the seed's type names from predict / test outputs"),
    "compare": ("commands.compare:compare", "one table across runs or arms: 95 % intervals, paired tests"),
    "sweep": ("commands.sweep:sweep", "accuracy at every checkpoint of a run, on its own or other test sets"),
}


class ReasoningLabCLI(LightningCLI):
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
            message = yaml_syntax_error(error, self.argv) or one_line(str(error), option_names(parser, self.argv))
            raise UserInputError(message) from None

    def _parse_ckpt_path(self) -> None:
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
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, logger = config.trainer, config.trainer.logger
        if trainer.default_root_dir:
            check_output_folder(trainer.default_root_dir, "trainer.default_root_dir")
        if isinstance(logger, Namespace) and logger.get("init_args"):
            check_run_names(logger.init_args)
            if logger.init_args.get("save_dir"):
                check_output_folder(logger.init_args.save_dir, "trainer.logger.init_args.save_dir")
        if self.subcommand == "fit":
            check_new_run(config)
        config.overwrite_run = False  # config.yaml never tells a later run to overwrite

    def _run_subcommand(self, subcommand: str) -> None:
        """Run; when bad input stops it, remove the run directory it created if that holds nothing yet."""
        run_dir = logger_run_dir(self.trainer) if is_launching_process() else None
        created = missing_folders(run_dir) if run_dir is not None else []
        try:
            super()._run_subcommand(subcommand)
        except Exception as error:
            if isinstance(our_error(error), UserInputError) and remove_unused_run(created):
                logging.getLogger(__name__).info("removed the unused run directory %s", run_dir)
            raise


def option_names(parser, argv: list[str]) -> list[str]:
    """The dotted option names of the subcommand in `argv` (or of `parser` itself): did-you-mean candidates."""
    actions = parser._actions
    for action in actions:
        choices = action.choices if isinstance(getattr(action, "choices", None), dict) else {}
        name = next((arg for arg in argv if arg in choices), None)
        if name is not None:
            actions = choices[name]._actions
            break
    return [action.dest for action in actions if action.dest not in ("help", "==SUPPRESS==")]


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


def is_launching_process() -> bool:
    """False in the extra processes of a multi-process run (DDP children, SLURM tasks other than rank 0)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def logger_run_dir(trainer) -> Path | None:
    """The run directory the trainer's logger writes to (None without a logger that has one)."""
    logger = trainer.logger
    return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None


def check_run_names(logger_args: Namespace) -> None:
    """The logger's experiment name and version become folders under its save_dir: plain names only."""
    for key in ("name", "version"):
        value = logger_args.get(key)
        if value not in (None, "") and not isinstance(value, int):
            check_name(value, f"trainer.logger.init_args.{key}")


def check_new_run(config: Namespace) -> None:
    """A new `fit` in an existing run directory (an explicit trainer.logger.init_args.version) would mix two runs:
    refused unless it resumes (--ckpt_path, or Lightning's own hpc checkpoint) or --overwrite_run starts over."""
    logger = config.trainer.logger
    if not isinstance(logger, Namespace) or not logger.get("init_args") or logger.init_args.get("version") is None:
        return
    if not is_launching_process():  # the other processes of a DDP run start after the first made the directory
        return
    args = logger.init_args
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    run_dir = Path(args.save_dir or ".") / str(args.get("name") or "") / version
    if config.get("ckpt_path") or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if any(Path(config.trainer.default_root_dir or os.getcwd()).glob("hpc_ckpt_*.ckpt")):
        return  # a requeued SLURM job: Lightning resumes from its hpc checkpoint
    if not config.get("overwrite_run"):
        raise UserInputError(
            f"trainer.logger.init_args.version: the run directory '{run_dir}' already holds a run; resume it with "
            "--ckpt_path last, choose another version, or start over in it with --overwrite_run true"
        )
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise UserInputError(f"--overwrite_run: '{run_dir}' holds the working directory; refusing to remove it")
    shutil.rmtree(check_inside(run_dir, Path(args.save_dir or "."), "--overwrite_run"))


def planning_of(model: LightningModule) -> PlanningSpec | None:
    """The model's planning-token spec (None for models without one, e.g. the SLOT evaluator)."""
    return getattr(model, "planning", None)


def resolve_last_checkpoint(config: Namespace) -> None:
    """`--ckpt_path last`: resume the newest run of this experiment in place (same run directory), from its newest
    complete checkpoint (`newest_checkpoint`)."""
    logger = config.trainer.logger
    if not isinstance(logger, Namespace) or "init_args" not in logger:
        raise UserInputError("--ckpt_path last needs a TensorBoard logger in the config (trainer.logger)")
    experiment = Path(logger.init_args.save_dir) / str(logger.init_args.name or "")
    runs = sorted(
        (int(match.group(1)), path)
        for path in experiment.glob("version_*")
        if (match := re.fullmatch(r"version_(\d+)", path.name)) and checkpoint_files(path / "checkpoints")
    )
    if not runs:
        raise UserInputError(f"--ckpt_path last: no {experiment}/version_*/checkpoints/*.ckpt to resume")
    run_dir = runs[-1][1]
    path, step = newest_checkpoint(run_dir / "checkpoints")
    logger.init_args.version = run_dir.name
    config.ckpt_path = str(path)
    print(f"Resuming {config.ckpt_path} (step {step})", flush=True)


def checkpoint_files(folder: Path) -> list[Path]:
    """The `*.ckpt` files and links in `folder` (not the hidden staging files of a save in progress)."""
    return sorted(path for path in folder.glob("*.ckpt") if not path.name.startswith("."))


def newest_checkpoint(folder: Path) -> tuple[Path, int]:
    """The newest complete checkpoint in `folder` and its step: the readable one of the highest global step (among
    equals, the one `last.ckpt` points at, else the newest file), so neither a truncated file nor a `last.ckpt`
    left behind (beside a `last-v1.ckpt`, say) is resumed. Named `last.ckpt` when that link points at it;
    unreadable files are passed over, with a warning."""
    last = folder / "last.ckpt"
    last_target = last.resolve() if last.exists() else None
    found: dict[Path, tuple[int, bool, float]] = {}
    unreadable = []
    for path in checkpoint_files(folder):
        target = path.resolve()
        if target in found or not target.is_file():
            continue
        try:
            step = int(read_checkpoint(target).get("global_step", -1))
        except UserInputError:
            unreadable.append(path.name)
            continue
        found[target] = (step, target == last_target, target.stat().st_mtime)
    if unreadable:
        logging.getLogger(__name__).warning("--ckpt_path last: passed over unreadable %s", ", ".join(unreadable))
    if not found:
        raise UserInputError(
            f"--ckpt_path last: no complete checkpoint in {folder} (unreadable: {', '.join(unreadable)})"
        )
    newest = max(found, key=found.get)
    return (last if newest == last_target else newest), found[newest][0]


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
            "callbacks": [RunSummary(), SampleWriter(), PlanningReport(), SlurmRequeue(), SafeCheckpoints()],
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # parse errors become one line (ReasoningLabCLI.parse_arguments)
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def run_command(name: str, args: list[str]) -> None:
    """Run companion command `name` with its own arguments."""
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        auto_cli(function, args=positional_words(function, args), as_positional=False, exit_on_error=False)
    except ArgumentError as error:
        message = yaml_syntax_error(error, args) or one_line(str(error), list(inspect.signature(function).parameters))
        raise UserInputError(f"{name}: {message}") from None


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
        close_process_group()
    except Exception as error:
        ours = our_error(error)
        if ours is None and (full := full_disk(error)) is not None:
            where = f" writing '{full.filename}'" if full.filename else ""
            print(f"error: {full.strerror}{where}: make room and run the command again", file=sys.stderr)
            sys.exit(2)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        sys.exit(ours.exit_code)


def close_process_group() -> None:
    """End a finished multi-process run's process group, so its gloo threads stop before the interpreter exits
    (otherwise a process can abort at exit: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def full_disk(error: BaseException | None) -> OSError | None:
    """The full-disk (or quota) OSError behind `error`, wherever it was raised (a log file, a sample table)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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
