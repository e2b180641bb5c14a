"""Lightning-style observers of a run: progress bars, per-layer logging, the report."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class Callback:
    """Override any of these; each receives the run state (``lowrank_kit.pipeline.state.RunState``)."""

    def on_run_start(self, run: Any) -> None: ...
    def on_phase_start(self, run: Any, phase: str) -> None: ...
    def on_phase_end(self, run: Any, phase: str, seconds: float) -> None: ...
    def on_layer_start(self, run: Any, layer: int) -> None: ...
    def on_layer_end(self, run: Any, layer: int) -> None: ...
    def on_run_end(self, run: Any, report: dict[str, Any]) -> None: ...


class ProgressBar(Callback):
    """A line per phase and a bar over decoder layers, on stderr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.started = time.perf_counter()

    def _say(self, text: str) -> None:
        tqdm.write(f"[lowrank-kit {time.perf_counter() - self.started:6.1f}s] {text}", file=sys.stderr)

    def on_phase_start(self, run: Any, phase: str) -> None:
        if phase == "compress":
            self.bar = tqdm(total=run.geometry.layers, desc="compress layers", unit="layer", file=sys.stderr)
        else:
            self._say(f"{phase} ...")

    def on_phase_end(self, run: Any, phase: str, seconds: float) -> None:
        if self.bar is not None and phase == "compress":
            self.bar.close()
            self.bar = None
        self._say(f"{phase} done in {seconds:.1f}s")

    def on_layer_end(self, run: Any, layer: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
