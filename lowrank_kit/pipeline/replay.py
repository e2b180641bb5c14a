"""Replaying calibration data through one decoder layer at a time.

The model computes masks and rotary embeddings once, above the layers, and may give
different layers different ones (Gemma3's sliding-window layers). So each layer's keyword
arguments are recorded by temporarily swapping every layer for a recorder that passes the
hidden states through unchanged; the forward stops after the last layer, before the head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_kit.models import hf_compat


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """One calibration batch at the current depth: hidden states and every layer's kwargs."""

    hidden: torch.Tensor
    kwargs: list[dict[str, Any]]


@contextmanager
def _recording(layers: nn.ModuleList, record: list[dict[str, Any]], first: list[torch.Tensor]) -> Iterator[None]:
    originals = [layer.forward for layer in layers]
    last = len(layers) - 1

    def recorder(index: int) -> Any:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                raise TypeError("decoder layers are expected to take keyword arguments after the hidden states")
            if index == 0:
                first.append(hidden_states)
            kwargs = dict(kwargs)
            kwargs["use_cache"] = False
            hf_compat.pop_cache(kwargs)
            record.append(kwargs)
            if index == last:
                raise _Stop
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield
    finally:
        for layer, forward in zip(layers, originals, strict=True):
            layer.forward = forward


@torch.no_grad()
def capture(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> LayerInputs:
    """Inputs of the first decoder layer and the kwargs of every layer for one batch."""
    record: list[dict[str, Any]] = []
    first: list[torch.Tensor] = []
    with _recording(layers, record, first), contextlib.suppress(_Stop):
        model(input_ids=input_ids, use_cache=False)
    if len(record) != len(layers):
        raise RuntimeError(f"recorded {len(record)} of {len(layers)} decoder layers")
    return LayerInputs(hidden=first[0], kwargs=record)


def run_layer(layer: nn.Module, inputs: LayerInputs, index: int) -> torch.Tensor:
    out = layer(inputs.hidden, **inputs.kwargs[index])
    return out[0] if isinstance(out, tuple) else out


class Spill:
    """Where the calibration batches' activations wait between layers: in memory, or, when all
    of them together exceed ``limit_mb`` (``runtime.inputs_memory_mb``), in files under ``folder``
    that are memory-mapped back, so only the batch a layer is running on is read in.

    The bytes go to the file and come back unchanged: spilling never changes a number.
    """

    def __init__(self, folder: Path | None, limit_mb: float | None):
        self.folder, self.limit = folder, None if limit_mb is None else limit_mb * 2**20
        self.files: dict[int, Path] = {}
        self.spilling: bool | None = None  # decided at the first batch, from the size of all of them
        self.written = 0  # bytes written, for the report

    def decide(self, batches: int, example: torch.Tensor) -> None:
        total = batches * example.numel() * example.element_size()
        self.spilling = self.limit is not None and self.folder is not None and total > self.limit

    def keep(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` (batch ``slot``'s activations at the next depth) as it is to be held."""
        hidden = hidden.cpu()
        if not self.spilling:
            return hidden
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        old = self.files.get(slot)
        path = self.folder / f"{slot:05d}-{self.written}.bin"  # a new name: the old file may still be mapped
        hidden.contiguous().view(torch.uint8).numpy().tofile(path)  # any dtype, bfloat16 too
        self.written += hidden.numel() * hidden.element_size()
        self.files[slot] = path
        if old is not None:
            old.unlink()  # its mapping, if still held, lives until released
        return torch.from_file(str(path), shared=False, size=hidden.numel(), dtype=hidden.dtype).view(hidden.shape)

    def close(self) -> None:
        for path in self.files.values():
            path.unlink(missing_ok=True)
        self.files.clear()
