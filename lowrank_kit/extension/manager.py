"""Plugin discovery and the per-run plugin manager (pluggy).

Built-ins and third-party plugins are both discovered through the entry-point group
``lowrank_kit``; each plugin module implements ``lowrank_register(registry)``. A run registers
only configured instances of the strategies its recipe selected in a fresh plugin manager, so
selection is by registration.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from importlib.metadata import entry_points

import pluggy

from lowrank_kit.extension import hookspecs
from lowrank_kit.extension.strategy import Strategy, StrategyRegistry
from lowrank_kit.recipe.schema import closest


def _discovery_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


HOOKS = tuple(sorted(name for name in vars(hookspecs) if name.startswith("lowrank_")))
_MARK = f"{hookspecs.PROJECT}_impl"  # the attribute pluggy's HookimplMarker sets on an implementation


def unknown_hooks(cls: type) -> list[str]:
    """Methods of a strategy class marked ``@hookimpl`` whose names are no hook (a typo never runs)."""
    return sorted(name for name in dir(cls) if hasattr(getattr(cls, name, None), _MARK) and name not in HOOKS)


def _unknown_hook_message(cls: type, names: list[str]) -> str:
    return "; ".join(f"{cls.__name__} ({cls.__module__}) marks '{n}' @hookimpl, which is no hook "
                     f"({closest(n, HOOKS)})" for n in names)


@functools.lru_cache(maxsize=1)
def registry() -> StrategyRegistry:
    """Every strategy of every installed plugin; a broken plugin or strategy is skipped with a warning."""
    reg = StrategyRegistry()
    pm = _discovery_manager()
    for ep in entry_points(group=hookspecs.PROJECT):
        try:
            pm.register(ep.load(), name=ep.name)
        except (Exception, SystemExit) as err:  # a third-party plugin must not break every run, even by exiting
            warnings.warn(f"lowrank_kit plugin '{ep.name}' ({ep.value}) failed to load: "
                          f"{type(err).__name__}: {err}", stacklevel=2)
    for impl in pm.hook.lowrank_register.get_hookimpls():
        try:
            impl.function(registry=reg)
        except (Exception, SystemExit) as err:
            warnings.warn(f"lowrank_kit plugin '{impl.plugin_name}' failed to register: "
                          f"{type(err).__name__}: {err}", stacklevel=2)
    for cls in reg.all():
        names = unknown_hooks(cls)
        if names:
            reg.remove(cls)
            warnings.warn(f"lowrank_kit strategy '{cls.name}' skipped: {_unknown_hook_message(cls, names)}",
                          stacklevel=2)
    return reg


def run_manager(strategies: Iterable[Strategy]) -> pluggy.PluginManager:
    """A plugin manager for one run, holding exactly the configured strategies.

    pluggy calls the implementations registered last first, so they are registered in reverse:
    every hook then runs the strategies in recipe order (the scoring pass calls lowrank_collect_dense
    on the transforms first). An implementation of no known hook is
    an error here, not a silent no-op.
    """
    pm = _discovery_manager()
    strategies = list(strategies)
    for cls in {type(s) for s in strategies}:
        names = unknown_hooks(cls)
        if names:
            raise TypeError(_unknown_hook_message(cls, names))
    for i, strategy in reversed(list(enumerate(strategies))):
        pm.register(strategy, name=f"{strategy.point}:{strategy.name}:{i}")
    pm.check_pending()
    return pm
