"""The packages are layered as the README's architecture table says: each imports only from layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    {"core"},
    {"tasks"},
    {"models"},
    {"evaluation"},
    {"datamodules", "lightning_modules", "callbacks"},
    {"commands", "integrations"},
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}
# Within the Lightning layer: callbacks may read what the other two produce, never the other way round.
SIDEWAYS = {("callbacks", "lightning_modules"), ("callbacks", "datamodules")}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level project packages each file of `package` imports (absolute imports)."""
    found = {}
    for file in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(file.relative_to(REPO))] = {name for name in names if name in LEVEL and name != package}
    return found


def test_every_package_is_in_a_layer():
    packages = {path.name for path in REPO.iterdir() if (path / "__init__.py").is_file() and path.name != "tests"}
    assert packages == set(LEVEL)


def test_imports_go_only_down_the_layers():
    wrong = []
    for package, level in LEVEL.items():
        for file, imported in imported_packages(package).items():
            for other in imported:
                if LEVEL[other] > level or (LEVEL[other] == level and (package, other) not in SIDEWAYS):
                    wrong.append(f"{file} imports {other}")
    assert not wrong, wrong
