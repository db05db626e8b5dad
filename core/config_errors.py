"""jsonargparse's errors in one place: one line out of its nested parse errors (the key at fault and, for an
unknown key, its valid neighbours: did-you-mean), a YAML syntax error's file and place, and the error behind its
wrapping of errors raised while instantiating.

jsonargparse reports a bad key inside a class (`--model.init_args.lora.rank 8`, a YAML `lora: {rr: 8}`) as a
tree of "Parser key" / "Does not validate against any of the Union subtypes" / "Problem with given class_path"
lines around the one line that matters. `one_line` walks that tree by indentation to the first leaf, rebuilds
the dotted key from its ancestors and lists the keys the class at that place accepts. It matches jsonargparse's
wording (the patterns below); tests/test_config_errors.py makes the real errors and checks the line, so a
jsonargparse upgrade that rewords them fails there.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from pathlib import Path

import yaml

Error = typing.TypeVar("Error", bound=BaseException)
STRUCTURE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
)
PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
UNKNOWN_OPTION = re.compile(r"Option '([^']+)' is not accepted")
UNKNOWN_IN_GROUP = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
UNKNOWN_IN_SUBCOMMAND = re.compile(r"Subcommand '[^']+' does not accept option '([^']+)'")
MAX_LISTED = 20  # valid keys listed in full up to this many
UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # jsonargparse's loader: the same errors and places


def parse_error_line(error: BaseException, argv: list[str], options: list[str]) -> str:
    """The one line for jsonargparse's parse `error` of `argv`: a YAML syntax error's file and place, else
    `one_line` (with `options`, the dotted names that argv's options may take)."""
    return yaml_syntax_error(error, argv) or one_line(str(error), options)


def one_line(message: str, options: list[str] | None = None) -> str:
    """The one line to show for jsonargparse error `message`; `options` are the top-level dotted option names
    (neighbours of an unrecognised top-level argument)."""
    lines = [line for line in message.splitlines() if line.strip()]
    ancestors: list[tuple[int, str]] = []
    leaf = None
    for line in lines:
        indent, text = len(line) - len(line.lstrip()), line.strip().removeprefix("- ")
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        if PARSER_KEY.fullmatch(text.rstrip(":")) or CLASS_PATH.fullmatch(text.rstrip(":")):
            ancestors.append((indent, text.rstrip(":")))
        elif not text.startswith(STRUCTURE):
            leaf = text
            break
    if leaf is None:
        return " ".join(line.strip() for line in lines)[:300]
    keys, owner = _place(ancestors)
    if match := UNKNOWN_OPTION.fullmatch(leaf):
        return _unknown([*keys, match.group(1)], _parameters(owner))
    if match := UNKNOWN_IN_SUBCOMMAND.fullmatch(leaf):
        return _unknown_option(match.group(1).split("."), options or [])
    if match := UNKNOWN_IN_GROUP.fullmatch(leaf):
        group, name = match.groups()
        if owner is None:
            return _unknown_option([*group.split("."), name], options or [])
        return _unknown([*keys, group, name], _parameters(_field_type(owner, group)))
    if match := UNRECOGNIZED.fullmatch(leaf):
        given = next((token for token in match.group(1).split() if token.startswith("--")), None)
        if given is None:
            return f"unrecognized arguments: {match.group(1)}"
        parts = given[2:].split("=", 1)[0].split(".")
        if owner is None:
            return _unknown_option(parts, options or [])
        for depth, part in enumerate(parts):  # the first part the class (or its nested dataclasses) lacks
            if part not in _parameters(owner) or depth == len(parts) - 1:
                return _unknown([*keys, *parts[: depth + 1]], _parameters(owner))
            owner = _field_type(owner, part)
    key = ".".join(keys)
    return f"{key}: {leaf}" if key else leaf


def _place(ancestors: list[tuple[int, str]]) -> tuple[list[str], type | None]:
    """The dotted key of the leaf (with `init_args` below a class given by class_path) and the innermost class."""
    keys: list[str] = []
    owner = None
    for _, text in ancestors:
        if match := PARSER_KEY.fullmatch(text):
            keys.extend(match.group(1).split("."))
        elif match := CLASS_PATH.fullmatch(text):
            owner = _import(match.group(1))
            if owner is not None and not dataclasses.is_dataclass(owner):
                keys.append("init_args")
    return keys, owner


def _unknown(keys: list[str], valid: list[str]) -> str:
    name = keys[-1]
    line = f"unknown key '{'.'.join(keys)}'"
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        line += f": did you mean {' or '.join(repr(c) for c in close)}?"
    where = ".".join(keys[:-1]) or "the top level"
    if 0 < len(valid) <= MAX_LISTED:
        line += f" ({where} takes: {', '.join(valid)})"
    elif valid:
        line += f" (--help lists the {len(valid)} keys {where} takes)"
    return line


def _unknown_option(parts: list[str], options: list[str]) -> str:
    """An unrecognised top-level option: neighbours among the options of the deepest group it names."""
    for depth in range(len(parts) - 1, -1, -1):
        prefix = "".join(f"{part}." for part in parts[:depth])
        siblings = sorted({option[len(prefix) :].split(".")[0] for option in options if option.startswith(prefix)})
        if siblings:
            return _unknown(parts[: depth + 1], siblings)
    return _unknown(parts, [])


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _parameters(owner: type | None) -> list[str]:
    if owner is None:
        return []
    try:
        parameters = inspect.signature(owner).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _field_type(owner: type | None, name: str) -> type | None:
    """The class of `owner`'s argument `name` (Optional[X] -> X); None when it is not a class."""
    if owner is None:
        return None
    try:
        hints = typing.get_type_hints(owner if dataclasses.is_dataclass(owner) else owner.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no neighbours, still one line
        return None
    hint = hints.get(name)
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if inspect.isclass(c) and c is not type(None)), None)


def yaml_syntax_error(error: BaseException, argv: list[str]) -> str | None:
    """`FILE:LINE:COLUMN: problem` for a YAML syntax error behind `error`; None when there is none.

    jsonargparse reads a config file into a string before parsing it, so its message says `<unicode string>`
    and its one-line form ends before the place. The file is found again among the YAML files in `argv`
    (`--config X`, `--config=X`, `--trainer X.yaml`): the first whose own parse fails at the same place."""
    found = cause_of_type(error, yaml.MarkedYAMLError)
    if found is None:
        return None
    failing = []  # (path, its own error): the files of argv that are not valid YAML
    for path in _yaml_arguments(argv):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
        except yaml.MarkedYAMLError as own:
            if (own.problem, _place_of(own.problem_mark)) == (found.problem, _place_of(found.problem_mark)):
                return _yaml_line(str(path), own)
            failing.append((path, own))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
    if failing:
        return _yaml_line(str(failing[0][0]), failing[0][1])
    return _yaml_line("YAML in a command-line value", found)


def cause_of_type(error: BaseException | None, kind: type[Error]) -> Error | None:
    """The error of type `kind` behind `error` (itself, or along its causes and contexts: jsonargparse wraps the
    errors raised while parsing and instantiating); None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _yaml_arguments(argv: list[str]) -> list[Path]:
    """Existing files named in `argv` that are YAML: after `--config`, or ending in .yaml / .yml."""
    paths = []
    for index, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        after_config = (index > 0 and argv[index - 1] == "--config") or arg.startswith("--config=")
        if (after_config or value.endswith((".yaml", ".yml"))) and Path(value).is_file():
            paths.append(Path(value))
    return paths


def _place_of(mark) -> tuple[int, int] | None:
    return None if mark is None else (mark.line, mark.column)


def _yaml_line(where: str, error: yaml.MarkedYAMLError) -> str:
    """`where:LINE:COLUMN: problem (context at line L, column C)` (1-based, as editors count)."""
    mark = error.problem_mark
    line = f"{where}:{mark.line + 1}:{mark.column + 1}: " if mark is not None else f"{where}: "
    line += error.problem or "invalid YAML"
    if error.context:
        context = error.context_mark
        at = f" at line {context.line + 1}, column {context.column + 1}" if context is not None else ""
        line += f" ({error.context}{at})"
    if "tab character" in (error.problem or "") or "'\\t'" in (error.problem or ""):  # libyaml / PyYAML's words
        line += "; YAML indents with spaces, not tabs"
    return line
