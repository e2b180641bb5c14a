"""Typed dataclasses as the single schema for recipes and strategy arguments.

One converter turns plain YAML data into dataclass instances and reports every problem with
its place (a dotted path such as ``transform[1].ridge``), so the validator, the plugin
listing and the recipe reference all read the same field definitions and cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union, get_args, get_origin


class RecipeError(ValueError):
    """A problem in user input, reported on one line with its place; the CLI exits with code 2."""

    def __init__(self, path: str, message: str, line: int | None = None, source: str | None = None):
        self.path, self.message, self.line, self.source = path, message, line, source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source or "recipe"
        if self.line is not None:
            where += f":{self.line}"
        place = f" {self.path}:" if self.path else ""
        return f"{where}:{place} {self.message}"


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelt name, or the list of valid names."""
    choices = sorted(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid: " + ", ".join(choices) if choices else "nothing is valid here"


# No setting of a recipe needs a number beyond 2**53 (exact in a float); larger ones are mistakes.
LARGEST = 2**53


def flat_fields(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted paths: ``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (a non-mapping is ``{prefix: value}``)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in value.items():
        out.update(flat_fields(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(tp: Any) -> str:
    """A short human name for a field type, for errors and generated docs."""
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, path)
            except RecipeError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else RecipeError(path, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise RecipeError(path, f"{value!r} is not allowed; {closest(str(value), map(str, get_args(tp)))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [convert(v, item, join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value) or abs(value) > LARGEST:
            raise RecipeError(path, f"expected a finite number of sane size, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(path, f"expected an integer, got {value!r}")
        if abs(value) > LARGEST:
            raise RecipeError(path, f"{value} is far too large for this setting")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(path, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors, never ignored."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping, got {data!r}")
    types_ = field_types(cls)
    for key in data:
        if key not in types_:
            raise RecipeError(join(path, str(key)), f"unknown key '{key}'; {closest(str(key), types_)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = convert(data[f.name], types_[f.name], join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(join(path, f.name), f"missing required key '{f.name}'")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a schema object, every default filled in (the resolved recipe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) per field; help comes from ``metadata={'help': ...}``."""
    rows = []
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f.name, type_name(types_[f.name]), default, f.metadata.get("help", "")))
    return rows
