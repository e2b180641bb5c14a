"""Caches shared by runs: pass-1 scores and dense-model evaluations (JSON files), and
dense-model statistics and weight factorisations (in memory, within one process such as a bench).

Entries are keyed by everything that determines them (the model's fingerprint, the data,
the strategies and their arguments), so a run at another ratio, or another recipe with the
same scorer, reuses them instead of recomputing (Fisher scoring is minutes of backward passes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_kit.calibration.stats import Statistic


def fingerprint(model: nn.Module, state: Iterable[tuple[str, torch.Tensor]] | None = None) -> str:
    """Identifies a model's weights and config cheaply: the config plus per-tensor sums.

    ``state``: the model's state-dict items when they are not all in memory (offloaded layers).
    """
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in (state if state is not None else model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{_sum(tensor):.10e}".encode())
    return digest.hexdigest()[:16]


def _sum(tensor: torch.Tensor, chunk: int = 1 << 20) -> float:
    """The float64 sum, a million elements at a time: a whole float64 copy of the embedding
    (226 MB for SmolLM2's 49,152 × 576) was the peak of a disk-offloaded run."""
    return float(sum(part.double().sum() for part in tensor.reshape(-1).split(chunk)))


# Part of every key: bump it when what an entry means changes, so old entries are not reused.
VERSION = 3


class Cache:
    """``folder/<kind>-<hash>.json`` files; ``folder=None`` disables caching."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    @staticmethod
    def _full_key(key: dict[str, Any]) -> Any:
        """The key as stored: versioned, and in its JSON form (tuples become lists)."""
        return json.loads(json.dumps({**key, "version": VERSION}, default=str))

    def _path(self, kind: str, key: dict[str, Any]) -> Path | None:
        if self.folder is None:
            return None
        text = json.dumps(self._full_key(key), sort_keys=True)
        return self.folder / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"

    def get(self, kind: str, key: dict[str, Any]) -> Any:
        path = self._path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # a damaged entry is recomputed, never trusted
            return None
        return entry["value"] if entry.get("key") == self._full_key(key) else None

    def put(self, kind: str, key: dict[str, Any], value: Any) -> None:
        path = self._path(kind, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": self._full_key(key), "value": value}, default=str))
        tmp.replace(path)  # atomic: a crash never leaves half an entry


def statistic_identity(key: str, stat: Statistic) -> str:
    """A statistic's tap key plus its kind and settings (e.g. AbsMean's power): equal identities
    on the same model and data mean equal sums."""
    settings = {k: v for k, v in sorted(vars(stat).items()) if not isinstance(v, torch.Tensor | None)}
    return f"{key}|{type(stat).__name__}|{settings}"


def _nbytes(value: Any) -> int:
    if isinstance(value, Statistic):
        return sum(t.numel() * t.element_size() for t in value.sums().values())
    return int(getattr(value, "nbytes", 0))


def _quarter_of_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class DenseStore:
    """Results that depend only on the dense model and the calibration data, kept in memory
    across the runs of one process (a bench): statistics of the dense model's activations
    (``calibration.sequential: false``), the transforms' statistics of the scoring pass (output
    Fishers) and the rank-independent factorisations of dense weights. Every ratio and every
    recipe reading them shares one copy.

    Holds one model and data (``base``) at a time: asking for another drops the rest. Past
    ``max_bytes`` (default a quarter of the machine's memory) new results are not kept.
    Callers must not modify what they get from it.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = _quarter_of_memory() if max_bytes is None else max_bytes
        self._base: str | None = None
        self._items: dict[str, Any] = {}
        self._bytes = 0

    def _select(self, base: str) -> None:
        if base != self._base:
            self._base, self._items, self._bytes = base, {}, 0

    def get(self, base: str, key: str) -> Any:
        self._select(base)
        return self._items.get(key)

    def put(self, base: str, key: str, value: Any) -> None:
        self._select(base)
        replaced = self._items.get(key)
        size = _nbytes(value) - (0 if replaced is None else _nbytes(replaced))  # a replaced entry's bytes go
        if self._bytes + size <= self.max_bytes:
            self._items[key] = value
            self._bytes += size
