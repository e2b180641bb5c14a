"""Lightning-style observers of a run: progress bars, per-layer logging, the report."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from lowrank_kit.pipeline.state import RunState


class Callback:
    """Override any of these; each receives the run state (None before the model is loaded)."""

    def on_run_start(self, run: RunState | None) -> None: ...
    def on_phase_start(self, run: RunState | None, phase: str) -> None: ...
    def on_phase_end(self, run: RunState | None, phase: str, seconds: float) -> None: ...
    def on_batches_start(self, run: RunState | None, label: str, total: int) -> None: ...
    def on_batch_end(self, run: RunState | None, label: str) -> None: ...
    def on_batches_end(self, run: RunState | None, label: str) -> None: ...
    def on_layer_start(self, run: RunState | None, layer: int) -> None: ...
    def on_layer_end(self, run: RunState | None, layer: int) -> None: ...
    def on_exception(self, run: RunState | None, error: BaseException) -> None: ...
    def on_run_end(self, run: RunState | None, report: dict[str, Any]) -> None: ...


class ProgressBar(Callback):
    """A line per phase and a bar over decoder layers, on stderr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None  # over decoder layers
        self.batches: tqdm | None = None  # over the calibration batches of a pass
        self.started = time.perf_counter()

    def _say(self, text: str) -> None:
        tqdm.write(f"[lowrank-kit {time.perf_counter() - self.started:6.1f}s] {text}", file=sys.stderr)

    def on_phase_start(self, run: RunState | None, phase: str) -> None:
        if phase == "compress" and run is not None:
            self.bar = tqdm(total=run.geometry.layers, desc="compress layers", unit="layer", file=sys.stderr)
        else:
            self._say(f"{phase} ...")

    def on_phase_end(self, run: RunState | None, phase: str, seconds: float) -> None:
        if self.bar is not None and phase == "compress":
            self.bar.close()
            self.bar = None
        self._say(f"{phase} done in {seconds:.1f}s")

    def on_layer_end(self, run: RunState | None, layer: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_batches_start(self, run: RunState | None, label: str, total: int) -> None:
        lead = run is None or run.fabric.global_rank == 0
        self.batches = tqdm(total=total, desc=label, unit="batch", leave=False, file=sys.stderr, disable=not lead)

    def on_batch_end(self, run: RunState | None, label: str) -> None:
        if self.batches is not None:
            self.batches.update(1)

    def on_batches_end(self, run: RunState | None, label: str) -> None:
        if self.batches is not None:
            self.batches.close()
            self.batches = None

    def on_exception(self, run: RunState | None, error: BaseException) -> None:
        for bar in (self.bar, self.batches):
            if bar is not None:
                bar.close()
        self.bar = self.batches = None
