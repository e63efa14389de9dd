"""YAML files read with their line numbers, and validation errors pointed at them.

Operators edit YAML by hand; an error that says only "value is not valid" is
useless. Everything here exists so that every complaint about a config or a
rate card names the file, the line and the field at fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError


@dataclass(frozen=True)
class SourceIssue:
    """One thing wrong with one file, located for a human."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class SourceError(Exception):
    """A file (or set of files) that failed to load; carries every issue found."""

    def __init__(self, issues: Iterable[SourceIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class _ExactConstructor(RoundTripConstructor):
    """Round-trip constructor for money files.

    YAML floats become `Decimal` built from the scalar's source text (so `0.1`
    is exactly one tenth, never the binary float 0.1000000000000000055...).
    Timestamps that look like dates but are not real dates (`2026-13-01`) stay
    strings, so validation reports them against their field instead of the
    parser crashing.
    """


def _construct_exact_float(constructor: RoundTripConstructor, node: Any) -> Any:
    text = str(constructor.construct_scalar(node)).strip().replace("_", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text  # `.inf`, `.nan` and friends: left for validation to reject
    return value if value.is_finite() else text


def _construct_lenient_timestamp(constructor: RoundTripConstructor, node: Any) -> Any:
    try:
        return RoundTripConstructor.construct_yaml_timestamp(constructor, node)
    except (ValueError, TypeError):
        return str(constructor.construct_scalar(node))


# add_constructor copies the table into the subclass: the stock loader is untouched.
_ExactConstructor.add_constructor("tag:yaml.org,2002:float", _construct_exact_float)
_ExactConstructor.add_constructor("tag:yaml.org,2002:timestamp", _construct_lenient_timestamp)


def read_yaml(path: Path, *, exact_numbers: bool = False) -> Any:
    """Parse `path` keeping line information (ruamel round-trip nodes).

    With `exact_numbers=True`, floats are read as exact `Decimal`s (see
    `_ExactConstructor`): use it for anything that holds money.
    """
    yaml = YAML(typ="rt")
    if exact_numbers:
        yaml.Constructor = _ExactConstructor
    try:
        with path.open("r", encoding="utf-8") as fh:
            return yaml.load(fh)
    except OSError as exc:
        raise SourceError([SourceIssue(str(path), 0, "-", f"cannot read file: {exc.strerror}")]) from exc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise SourceError([SourceIssue(str(path), line, "-", f"invalid YAML: {exc.problem or exc}")]) from exc


def line_of(node: Any, loc: Iterable[str | int]) -> int:
    """1-based line of the deepest node along `loc` that the document still has."""
    line = 1
    current = node
    for part in loc:
        if isinstance(current, CommentedMap) and part in current:
            try:
                line = current.lc.key(part)[0] + 1
            except (KeyError, TypeError):
                pass
            current = current[part]
        elif isinstance(current, CommentedSeq) and isinstance(part, int) and 0 <= part < len(current):
            try:
                line = current.lc.item(part)[0] + 1
            except (KeyError, TypeError):
                pass
            current = current[part]
        else:
            # Pydantic puts union/tag names and unknown keys into `loc`;
            # stop at the last node that exists.
            if isinstance(current, (CommentedMap, CommentedSeq)) and hasattr(current, "lc"):
                line = max(line, current.lc.line + 1)
            break
    return line


def issues_from_validation(path: Path, document: Any, error: ValidationError) -> list[SourceIssue]:
    """Turn a pydantic error into located issues, one per problem."""
    issues = []
    for err in error.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(str(p) for p in loc) or "-"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        issues.append(SourceIssue(str(path), line_of(document, loc), field, message))
    return issues


def to_plain(node: Any) -> Any:
    """Round-trip nodes to plain dicts/lists, so validators see ordinary data."""
    if isinstance(node, dict):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [to_plain(v) for v in node]
    return node
