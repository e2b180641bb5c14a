"""One progress mechanism: every long loop wraps its iterable in a ``Progress`` it is given.

Inside a run the engine hands out one that sends ``on_batches_start``/``on_batch_end``/
``on_batches_end`` to the callbacks (the ``ProgressBar`` callback draws them); outside a run
(``lowrank-kit eval``, a bench's cells) ``console`` draws a bar itself, and ``quiet`` draws none.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Progress(Protocol):
    def __call__(self, items: Iterable[T], total: int, label: str) -> Iterator[T]: ...


def quiet(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    yield from items


def console(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    yield from tqdm(items, total=total, desc=label, leave=False, file=sys.stderr)
