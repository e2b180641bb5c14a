"""Recipes: YAML → validated objects (``recipe.spec``), before any model is loaded.

Every error names its place (file, line and key path) and, for an unknown key or strategy,
the closest valid name. ``--set key.path=value`` overrides are applied to the raw data first,
so they are validated like the file itself.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

from lowrank_kit.data.texts import check_name
from lowrank_kit.extension.manager import registry
from lowrank_kit.recipe import yaml_input
from lowrank_kit.recipe.schema import RecipeError, closest, flat_fields, from_dict, join
from lowrank_kit.recipe.spec import SECTIONS, TOP_KEYS, EvalSpec, Recipe, StrategyChoice


def _strategy(point: str, raw: Any, path: str) -> StrategyChoice:
    if isinstance(raw, str):
        raw = {"plugin": raw}
    if not isinstance(raw, dict) or "plugin" not in raw:
        raise RecipeError(path, f"expected a strategy name or a mapping with 'plugin', got {raw!r}")
    raw = dict(raw)
    name = raw.pop("plugin")
    cls = registry().get(point, str(name), join(path, "plugin"))
    targets: list[str] = []
    if point == "transform":
        targets = raw.pop("targets", list(cls.default_targets or cls.allowed_targets))
        if not isinstance(targets, list):
            raise RecipeError(join(path, "targets"), f"expected a list of projections, got {targets!r}")
        cls.check_targets(targets, join(path, "targets"))
    return StrategyChoice(point, cls.name, from_dict(cls.Args, raw, path), targets, cls)


def _strategy_list(point: str, raw: Any, path: str) -> list[StrategyChoice]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    return [_strategy(point, item, join(path, i) if isinstance(raw, list) else path) for i, item in enumerate(items)]


def from_data(data: Any, source: str | None = None) -> Recipe:
    """Validate plain data (a parsed YAML file, with overrides applied) into a Recipe."""
    if not isinstance(data, dict):
        raise RecipeError("", "a recipe is a mapping of keys such as model, calibration, target, transform")
    for key in data:
        if key not in TOP_KEYS:
            raise RecipeError(str(key), f"unknown key '{key}'; {closest(str(key), TOP_KEYS)}")
    for key in ("name", "model", "target", "transform"):
        if data.get(key) is None:
            raise RecipeError(key, f"missing required key '{key}'")
    if not isinstance(data["name"], str):
        raise RecipeError("name", f"expected a string, got {data['name']!r}")
    sections = {key: from_dict(cls, data.get(key), key) for key, cls in SECTIONS.items()}
    evaluate = [] if data.get("evaluate") is None else data["evaluate"]
    if not isinstance(evaluate, list):
        raise RecipeError("evaluate", "expected a list of evaluations")
    transform = _strategy_list("transform", data["transform"], "transform")
    if not transform:
        raise RecipeError("transform", "needs at least one transform, e.g. [svd_llm]")
    _check_overlap(transform)
    recipe = Recipe(
        name=data["name"],
        transform=transform,
        allocate=_strategy("allocate", "uniform" if data.get("allocate") is None else data["allocate"], "allocate"),
        collect=_strategy_list("collect", data.get("collect"), "collect"),
        score=_strategy_list("score", data.get("score"), "score"),
        decode=None if data.get("decode") is None else _strategy("decode", data["decode"], "decode"),
        evaluate=[from_dict(EvalSpec, e, join("evaluate", i)) for i, e in enumerate(evaluate)],
        source=source,
        **sections,
    )
    if isinstance(recipe.calibration.dataset, str):
        check_name(recipe.calibration.dataset, "calibration.dataset")
    else:
        for i, source in enumerate(recipe.calibration.sources()):
            check_name(source.dataset, f"calibration.dataset[{i}]" + ("" if isinstance(
                recipe.calibration.dataset[i], str) else ".dataset"))
    for i, spec in enumerate(recipe.evaluate):
        check_name(spec.dataset, f"evaluate[{i}].dataset")
    _check_scores(recipe)
    return recipe


def _check_scores(recipe: Recipe) -> None:
    """The allocator's importances must come from a score strategy of the recipe, at its level."""
    allocator = recipe.allocate.cls
    level = allocator.consumes
    if level is None:
        if allocator.needs_scores and not recipe.score:
            raise RecipeError("allocate", f"'{allocator.name}' allocates from importances: add a 'score' strategy")
        return
    if any(choice.cls.produces == level for choice in recipe.score):
        return
    producers = sorted(cls.name for cls in registry().all() if cls.point == "score" and cls.produces == level)
    given = ", ".join(f"'{c.plugin}' (per-{c.cls.produces or 'unknown'} importances)" for c in recipe.score)
    raise RecipeError("allocate", f"'{allocator.name}' allocates from per-{level} importances, which "
                                  f"{'score ' + given + ' does not give' if given else 'no score strategy gives'}; "
                                  f"use score: {' or '.join(producers) or 'a strategy producing them'}")


def _check_overlap(transforms: list[StrategyChoice]) -> None:
    owner: dict[str, int] = {}
    for i, choice in enumerate(transforms):
        for target in choice.targets:
            if target in owner:
                first = transforms[owner[target]]
                raise RecipeError(
                    f"transform[{i}].targets",
                    f"'{target}' is already taken by transform[{owner[target]}] ({first.plugin}); "
                    "two transforms never rewrite the same module: remove it from one of them",
                )
            owner[target] = i


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``a.b[0].c=value`` → (['a', 'b', 0, 'c'], parsed YAML value)."""
    if "=" not in text:
        raise RecipeError("--set", f"expected key.path=value, got '{text}'")
    key, value = text.split("=", 1)
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+", key):
        parts.append(int(token) if token.isdigit() else token)
    if not parts:
        raise RecipeError("--set", f"empty key in '{text}'")
    if not value:
        return parts, None
    try:
        parsed, _ = yaml_input.parse(value, "a --set value")
    except RecipeError as err:
        raise RecipeError("--set", f"{key}: the value '{value}' is {err.message}") from None
    return parts, parsed


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Return a copy of the raw recipe with dotted-path overrides set."""
    data = copy.deepcopy(data)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else [
        (parse_override(f"{k}=")[0], v) for k, v in overrides.items()
    ]
    for parts, value in items:
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise RecipeError(_path(parts[: i + 1]), "no such list item to override")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise RecipeError(_path(parts[: i + 1]), "cannot set a key inside a non-mapping")
                if node.get(part) is None:
                    node[part] = {}
                elif isinstance(node[part], str):  # "allocate: uniform", then --set allocate.x=1
                    node[part] = {"plugin": node[part]}
                node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise RecipeError(_path(parts), "no such list item to override")
        elif not isinstance(node, dict):
            raise RecipeError(_path(parts), "cannot set a key inside a non-mapping")
        node[last] = value
    return data


def _path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        out = join(out, part)
    return out


def _locate(err: RecipeError, lines: dict[str, int]) -> None:
    """The line of the error's key path, or of its nearest enclosing key that has one."""
    path = err.path
    while path and path not in lines:
        shorter = re.sub(r"(\.[^.\[\]]*|\[\d+\]|^[^.\[\]]*)$", "", path)
        path = shorter if shorter != path else ""
    err.line = lines.get(path)


def shipped() -> dict[str, Path]:
    """The recipes installed with the package, by name (file name without ``.yaml``)."""
    from importlib.resources import files

    try:
        folder = Path(str(files("lowrank_kit.recipes")))
    except ModuleNotFoundError:  # a source checkout that was never installed
        folder = Path(__file__).resolve().parents[2] / "recipes"
    return {item.stem: item for item in sorted(folder.glob("*.yaml"))}


def resolve_path(path: str | Path) -> Path:
    """A recipe file, or the shipped recipe of that name; a located error with a suggestion otherwise."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    known = shipped()
    name = str(path).removesuffix(".yaml")
    if name in known and "/" not in name:
        return known[name]
    near = difflib.get_close_matches(Path(name).name, known, n=1, cutoff=0.6)
    hint = (f"; did you mean the shipped recipe '{near[0]}'?" if near
            else f"; shipped recipes: {', '.join(sorted(known))}")
    raise RecipeError("", f"no recipe file at '{path}' and no shipped recipe of that name{hint}", source=str(path))


def load(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every problem is a located RecipeError."""
    path = resolve_path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data, lines = yaml_input.parse(text)
    except UnicodeDecodeError as err:
        raise RecipeError("", f"not UTF-8 text (byte {err.start}): a recipe is a YAML text file",
                          source=str(path)) from None
    except RecipeError as err:
        err.source = str(path)
        raise
    return from_raw(data, overrides, source=str(path), lines=lines)


def from_raw(
    data: Any,
    overrides: dict[str, Any] | list[str] | None = None,
    source: str | None = None,
    lines: dict[str, int] | None = None,
) -> Recipe:
    try:
        if overrides:
            if not isinstance(data, dict):
                raise RecipeError("", "a recipe is a mapping")
            data = apply_overrides(data, overrides)
        return from_data(data, source)
    except RecipeError as err:
        err.source = err.source or source
        if err.line is None and lines:
            _locate(err, lines)
        raise


__all__ = ["Recipe", "RecipeError", "StrategyChoice", "from_raw", "load", "resolve_recipe"]


def resolve_recipe(recipe: str | Path | dict[str, Any] | Recipe,
                   overrides: dict[str, Any] | list[str] | None = None, **sections: Any) -> Recipe:
    """A validated Recipe from a path, raw dict or Recipe, with overrides.

    ``overrides`` are dotted paths (``{"target.ratio": 0.3}`` or ``["target.ratio=0.3"]``);
    keyword sections merge key by key (``target={"ratio": 0.3}`` changes only the ratio).
    """
    merged: dict[str, Any] = {}
    for key, value in sections.items():
        merged.update(flat_fields(value, key))
    if isinstance(overrides, list):
        # JSON is YAML flow syntax: None stays null (a Python repr would make it the text "None").
        extra = overrides + [f"{k}={json.dumps(v)}" for k, v in merged.items()]
        all_overrides: dict[str, Any] | list[str] = extra
    else:
        all_overrides = {**(overrides or {}), **merged}
    if isinstance(recipe, Recipe):
        if all_overrides:
            return from_raw(recipe.to_dict(), all_overrides, source=recipe.source)
        return recipe
    if isinstance(recipe, dict):
        return from_raw(recipe, all_overrides)
    return load(recipe, all_overrides)
