"""Strategies: named, configurable plugin classes, found through the ``lowrank_kit`` entry points.

A strategy class names its hook point, has a dataclass of typed arguments with defaults, and
implements the hooks it needs with ``@hookimpl``. Built-ins and third-party plugins are both
discovered through the entry-point group ``lowrank_kit``; each plugin module implements
``lowrank_register(registry)``. A run registers only configured instances of the strategies
its recipe selected in a fresh plugin manager, so selection is by registration.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import pluggy

from lowrank_kit import hookspecs
from lowrank_kit.schema import RecipeError, closest

HookPoint = Literal["collect", "score", "allocate", "transform", "decode"]
HOOK_POINTS: tuple[str, ...] = ("collect", "score", "allocate", "transform", "decode")


@dataclasses.dataclass
class NoArgs:
    """For strategies without arguments."""


class Strategy:
    """Base class of every strategy. Subclasses set the class attributes and implement hooks."""

    name: ClassVar[str]
    point: ClassVar[str]
    description: ClassVar[str]
    Args: ClassVar[type] = NoArgs
    # Transforms only: the projections they may rewrite (recipe key ``targets``), and whether
    # the chosen targets must be all of them (e.g. head-wise PCA rewrites v and o together).
    allowed_targets: ClassVar[tuple[str, ...]] = ()
    targets_all_or_none: ClassVar[bool] = False
    # Allocators only: whether the recipe must also select a score strategy.
    needs_scores: ClassVar[bool] = False

    def __init__(self, args: Any = None, targets: Iterable[str] = ()):
        self.args = args if args is not None else self.Args()
        self.targets: tuple[str, ...] = tuple(targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"

    @classmethod
    def check_targets(cls, targets: list[str], path: str) -> None:
        """Reject targets this transform cannot rewrite; called by the recipe validator."""
        for i, target in enumerate(targets):
            if target not in cls.allowed_targets:
                raise RecipeError(
                    f"{path}[{i}]",
                    f"'{cls.name}' cannot target '{target}'; {closest(target, cls.allowed_targets)}",
                )
        if len(set(targets)) != len(targets):
            raise RecipeError(path, "a target is listed twice")
        if cls.targets_all_or_none and set(targets) != set(cls.allowed_targets):
            raise RecipeError(path, f"'{cls.name}' rewrites {list(cls.allowed_targets)} together")


class StrategyRegistry:
    """Strategy classes by hook point and name, with where each came from."""

    def __init__(self) -> None:
        self._classes: dict[str, dict[str, type[Strategy]]] = {p: {} for p in HOOK_POINTS}
        self.sources: dict[tuple[str, str], str] = {}

    def add(self, cls: type[Strategy], source: str | None = None) -> None:
        if cls.point not in self._classes:
            raise ValueError(f"{cls.__name__}.point must be one of {HOOK_POINTS}, not {cls.point!r}")
        if not dataclasses.is_dataclass(cls.Args):
            raise ValueError(f"{cls.__name__}.Args must be a dataclass")
        self._classes[cls.point][cls.name] = cls
        self.sources[(cls.point, cls.name)] = source or cls.__module__

    def names(self, point: str) -> list[str]:
        return sorted(self._classes[point])

    def get(self, point: str, name: str, path: str = "") -> type[Strategy]:
        found = self._classes[point].get(name)
        if found is None:
            raise RecipeError(path, f"unknown {point} strategy '{name}'; {closest(name, self._classes[point])}")
        return found

    def all(self) -> list[type[Strategy]]:
        return [cls for point in HOOK_POINTS for _, cls in sorted(self._classes[point].items())]


def _discovery_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


@functools.lru_cache(maxsize=1)
def registry() -> StrategyRegistry:
    """Every strategy of every installed plugin; a broken plugin is skipped with a warning."""
    reg = StrategyRegistry()
    pm = _discovery_manager()
    for ep in entry_points(group=hookspecs.PROJECT):
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as err:  # a third-party plugin must not break every run
            warnings.warn(f"lowrank_kit plugin '{ep.name}' ({ep.value}) failed to load: {err}", stacklevel=2)
    for impl in pm.hook.lowrank_register.get_hookimpls():
        try:
            impl.function(registry=reg)
        except Exception as err:
            warnings.warn(f"lowrank_kit plugin '{impl.plugin_name}' failed to register: {err}", stacklevel=2)
    return reg


def run_manager(strategies: Iterable[Strategy]) -> pluggy.PluginManager:
    """A plugin manager for one run, holding exactly the configured strategies."""
    pm = _discovery_manager()
    for i, strategy in enumerate(strategies):
        pm.register(strategy, name=f"{strategy.point}:{strategy.name}:{i}")
    return pm
