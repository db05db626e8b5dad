"""reasoning-lab's one entry point: `python cli.py {fit,validate,test,predict} --config CONFIG.yaml`.

Configs stack left to right (`--config configs/planning_gsm8k.yaml --config configs/presets/cpu_demo.yaml`)
and any key can be overridden on the command line (`--trainer.max_steps 10`). `--print_config` shows
the resolved configuration; `--help` documents every argument.

The parser of these subcommands, with its bad-input rules, is commands/lightning_cli.py. This file runs it or a
companion command (`python cli.py COMMAND`, listed in `COMMANDS`) and turns our errors into one `error:` line.
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

import errno
import importlib
import inspect
import itertools
import json
import logging
import sys
import typing
from collections.abc import Callable

from jsonargparse import ArgumentError, auto_cli

from commands.lightning_cli import build_cli
from core.config_errors import cause_of_type, parse_error_line
from core.errors import ReasoningLabError, UserInputError

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
    "pool": ("commands.pool:pool", "a dynamics pool with upstream's type names from predict / test outputs"),
    "compare": ("commands.compare:compare", "one table across runs or arms: 95 % intervals, paired tests"),
    "sweep": ("commands.sweep:sweep", "accuracy at every checkpoint of a run, on its own or other test sets"),
}


def run_command(name: str, args: list[str]) -> None:
    """Run companion command `name` with its own arguments."""
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        auto_cli(function, args=positional_words(function, args), as_positional=False, exit_on_error=False)
    except ArgumentError as error:
        message = parse_error_line(error, args, list(inspect.signature(function).parameters))
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
        ours = cause_of_type(error, ReasoningLabError)
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


if __name__ == "__main__":
    main()
