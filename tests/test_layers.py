"""The packages are layered as the README's architecture table says: each imports only from layers below it.

Every import counts, wherever it is written (in a function too), and cli.py is in the top layer: nothing imports
it but tests, scripts and benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

LAYERS = [
    {"core"},
    {"tasks"},
    {"models"},
    {"evaluation"},
    {"datamodules", "lightning_modules", "callbacks"},
    {"cli", "commands", "integrations"},
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}
# Within a layer: callbacks may read what the other two Lightning packages produce, never the other way round;
# cli.py runs the commands (its parser is commands/lightning_cli.py), never the other way round.
SIDEWAYS = {("callbacks", "lightning_modules"), ("callbacks", "datamodules"), ("cli", "commands")}


def imports_in(source: str, filename: str = "<source>") -> set[str]:
    """Top-level names of every absolute import in `source`, at module level or inside a function or class."""
    names = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def files_of(unit: str) -> list[Path]:
    """The files of a package, or the one file of a root module (cli.py)."""
    return sorted((REPO / unit).rglob("*.py")) if (REPO / unit).is_dir() else [REPO / f"{unit}.py"]


def imported_units(unit: str) -> dict[str, set[str]]:
    """The project's packages and root modules each file of `unit` imports."""
    found = {}
    for file in files_of(unit):
        imported = imports_in(file.read_text(), str(file))
        found[str(file.relative_to(REPO))] = {name for name in imported if name in LEVEL and name != unit}
    return found


def test_every_package_and_root_module_is_in_a_layer():
    packages = {path.name for path in REPO.iterdir() if (path / "__init__.py").is_file() and path.name != "tests"}
    modules = {path.stem for path in REPO.glob("*.py")}
    assert packages | modules == set(LEVEL)


def test_imports_inside_functions_are_seen():
    source = "import os\n\ndef run():\n    from cli import build_cli\n\nclass A:\n    import models.loader\n"
    assert imports_in(source) == {"os", "cli", "models"}


def test_imports_go_only_down_the_layers():
    wrong = []
    for unit, level in LEVEL.items():
        for file, imported in imported_units(unit).items():
            for other in imported:
                if LEVEL[other] > level or (LEVEL[other] == level and (unit, other) not in SIDEWAYS):
                    wrong.append(f"{file} imports {other}")
    assert not wrong, wrong
