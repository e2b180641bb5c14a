"""A failure during a run, told in one line: what failed, where, and where the traceback went.

The engine annotates any exception that is not a recipe error (keeping its type, so Python
callers catch what they always caught) with one line naming the phase, the strategy whose hook
raised (found in the traceback: pluggy calls its method directly), the hook and the decoder
layer where they apply, and writes the full traceback to a log file beside the output folder.
The CLI prints that line and the log's path and exits 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from types import TracebackType

from lowrank_kit.extension.strategy import Strategy


def annotate(error: BaseException, message: str, log: Path | None) -> None:
    """Attach the one-line description and the log's path to an exception raised during a run."""
    error.lowrank_summary = message  # type: ignore[attr-defined]
    error.lowrank_log = log  # type: ignore[attr-defined]
    error.add_note(f"lowrank-kit: {message}" + (f" (traceback in {log})" if log else ""))


def summary(error: BaseException) -> tuple[str, Path | None]:
    """The one line and log path of an annotated exception, or the exception itself as a line."""
    return getattr(error, "lowrank_summary", f"{type(error).__name__}: {error}"), getattr(error, "lowrank_log", None)


def failing_strategy(tb: TracebackType | None) -> tuple[Strategy, str] | None:
    """The outermost strategy method in a traceback, and its name (the hook it implements)."""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Strategy):
            return owner, tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return None


def describe(error: BaseException, phase: str | None, layer: int | None) -> str:
    """One line: phase, strategy and hook, layer, then the error itself."""
    parts = [f"{phase} failed" if phase else "the run failed"]
    found = failing_strategy(error.__traceback__)
    if found is not None:
        strategy, hook = found
        parts.append(f"in {strategy.point} strategy '{strategy.name}' ({hook})")
    if layer is not None:
        parts.append(f"at decoder layer {layer}")
    return " ".join(parts) + f": {type(error).__name__}: {error}"


def write_log(error: BaseException, folder: Path, name: str) -> Path | None:
    """The full traceback in ``folder/lowrank-kit-error-<name>-<time>.log``; None if it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"lowrank-kit-error-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        path.write_text("".join(traceback.format_exception(error)))
        return path
    except OSError:
        return None


def interrupted(phase: str | None, layer: int | None) -> str:
    """Where Ctrl-C (or SIGTERM turned into KeyboardInterrupt) stopped a run."""
    where = f"during {phase}" if phase else "before any work"
    return f"interrupted {where}" + (f" at decoder layer {layer}" if layer is not None else "")
