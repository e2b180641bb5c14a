"""Reading YAML from users with limits: size, nesting depth, alias expansion, duplicate keys.

A recipe is small; anything far larger is a mistake or an attack (a 1 KB "billion laughs"
alias bomb expands to gigabytes when walked). The document is composed once into YAML nodes,
checked, and constructed from the same nodes, which also give every key path its line.
"""

from __future__ import annotations

from typing import Any

import yaml

from lowrank_kit.recipe.schema import RecipeError, join

MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 20_000  # nodes after alias expansion: the shipped recipes have about 100


def _check(root: yaml.Node, where: str) -> dict[str, int]:
    """Bounded walk of the node tree: duplicate keys, depth, expanded size; returns key path → line."""
    lines: dict[str, int] = {}
    count = 0

    def walk(node: yaml.Node, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise RecipeError("", f"{where} expands to more than {MAX_NODES:,} YAML nodes (anchors and aliases "
                                  "repeated?); a recipe needs far fewer", node.start_mark.line + 1)
        if depth > MAX_DEPTH:
            raise RecipeError(path, f"nested more than {MAX_DEPTH} levels deep", node.start_mark.line + 1)
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.tag}>"
                if name in seen:
                    raise RecipeError(join(path, str(name)), f"key '{name}' appears twice (first on line "
                                      f"{seen[name]}); keep one", key.start_mark.line + 1)
                seen[name] = key.start_mark.line + 1
                sub = join(path, str(name))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, join(path, i), depth + 1)

    walk(root, "", 0)
    return lines


def parse(text: str, where: str = "recipe") -> tuple[Any, dict[str, int]]:
    """The data of one YAML document and the line of every key path; every problem a RecipeError."""
    if len(text) > MAX_BYTES:
        raise RecipeError("", f"{where} is {len(text):,} characters; a recipe is far below {MAX_BYTES:,}")
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # the reader already rejects some characters here
        root = loader.get_single_node()
        if root is None:
            return None, {}
        lines = _check(root, where)
        return loader.construct_document(root), lines
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).splitlines()[0]
        raise RecipeError("", f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    except RecursionError:
        raise RecipeError("", f"{where} is nested too deeply to read (more than {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()
