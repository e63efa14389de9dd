"""`value`: frozen to the type checker, a plain dataclass at run time, equal and hashed as a frozen one."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from mypy import api as mypy_api

from pricing.money import Usage
from pricing.values import value


@value
class _Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = dataclasses.field(default=())


def test_values_with_the_same_fields_are_equal_and_hash_alike():
    assert _Point(1, 2) == _Point(1, 2) != _Point(1, 3)
    assert hash(_Point(1, 2)) == hash(_Point(1, 2))
    assert {_Point(1, 2): "a"}[_Point(1, 2)] == "a"


def test_a_value_hashes_as_the_frozen_dataclass_it_replaced():
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: int
        y: int = 0
        tags: tuple[str, ...] = ()

    assert hash(_Point(4, 5, ("a",))) == hash(Frozen(4, 5, ("a",)))


def test_replace_makes_a_new_value_and_leaves_the_old_one():
    usage = Usage(prompt_tokens=10, completion_tokens=2)
    more = dataclasses.replace(usage, completion_tokens=7)
    assert (usage.completion_tokens, more.completion_tokens, more.prompt_tokens) == (2, 7, 10)


def test_the_type_checker_refuses_an_assignment_to_a_field(tmp_path: Path):
    source = tmp_path / "assigns.py"
    source.write_text(textwrap.dedent("""
        from pricing.money import Usage
        from pricing.values import value

        @value
        class Point:
            x: int

        Point(1).x = 2
        Usage(prompt_tokens=1, completion_tokens=1).prompt_tokens = 3
    """))
    out, _, status = mypy_api.run([str(source), "--cache-dir", str(tmp_path / "cache"), "--ignore-missing-imports"])
    assert status == 1, out
    assert out.count("is read-only") == 2, out
