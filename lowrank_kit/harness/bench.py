"""``lowrank-kit bench``: every recipe at every ratio on one model and one set of data.

The dense model is loaded once and copied for each cell; pass-1 scores and the dense model's
evaluations come from the shared cache, so Fisher scoring or the dense generations run once
for the whole table. A recipe that differs from the one before only in its decode strategy
(flrc after flrc_static) reuses that compressed model instead of compressing again. Each
finished cell is written at once (its report under ``cells/``, the table rewritten), so an
interrupted bench loses nothing and a re-run skips finished cells. A cell that fails is a row
with its error; the others still run.
"""

from __future__ import annotations

import copy
import csv
import gc
import io as text_io
import json
import os
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lowrank_kit.models.loading import load_model
from lowrank_kit.pipeline.cache import DenseStore
from lowrank_kit.pipeline.engine import Engine, same_compression
from lowrank_kit.recipe.loading import resolve_recipe
from lowrank_kit.recipe.schema import RecipeError, to_dict
from lowrank_kit.recipe.spec import Recipe

SHARED = ("model", "calibration", "evaluate")  # what every recipe of a bench must agree on
COLUMNS = ("recipe", "target_ratio", "achieved_ratio", "perplexity", "ppl_x_dense", "perplexity_2", "ppl_2_x_dense",
           "lastword_acc", "rougeL_vs_dense", "decode_macs_saved", "compress_s", "peak_rss_mb", "prefill_tok_s",
           "decode_tok_s", "error")


class PeakMemory:
    """Samples this process's resident memory while a cell runs (ru_maxrss only ever grows)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s = every_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except OSError:  # not Linux: the lifetime peak is the best available
            from lowrank_kit.reporting.report import peak_memory_mb

            return peak_memory_mb()["peak_rss_mb"]
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def plan_cells(recipes: list[str | Path], ratios: list[float], output: Path,
               overrides: list[str] | None = None, save_models: bool = False) -> list[Recipe]:
    """Every (recipe, ratio) as a validated recipe writing under ``output/cells``; all checked first."""
    if not recipes:
        raise RecipeError("", "bench needs at least one recipe")
    for ratio in ratios:
        if not 0.0 < ratio < 1.0:
            raise RecipeError("--ratios", f"every ratio must lie strictly between 0 and 1, got {ratio}")
    cells = []
    for ratio in ratios:  # ratio by ratio, so a decode-only variant follows its base recipe
        for path in recipes:
            recipe = resolve_recipe(path, [*(overrides or []), f"target.ratio={ratio}",
                                           f"output.save_model={str(save_models).lower()}"])
            folder = output / "cells" / f"{recipe.name}-{ratio:g}"
            cells.append(resolve_recipe(recipe, [f"output.dir={folder}"]))
    def shared(cell: Recipe) -> dict[str, Any]:  # recipes may take statistics differently from the same data
        return {**cell.to_dict(), "calibration": cell.calibration_data()}

    first = shared(cells[0])
    for cell in cells[1:]:
        data = shared(cell)
        for key in SHARED:
            if data[key] != first[key]:
                raise RecipeError(key, f"'{cell.source}' differs from '{cells[0].source}' in '{key}': a bench "
                                       "compares methods on one model and one set of data (use --set to align them)",
                                  source=cell.source)
    return cells


def _evaluation_columns(report: dict[str, Any], side: str) -> dict[str, Any]:
    """Perplexity, last-word, ROUGE-L and speed of the ``side`` ("dense" or "compressed") model.

    The first evaluation of each metric fills the columns; a second perplexity (e.g. on a text of
    another domain) fills ``perplexity_2``, each with its ratio to the dense model's.
    """
    columns: dict[str, Any] = {}
    for entry in report["evaluation"]:
        details = entry.get("details", {}).get(side, {})
        if entry["metric"] == "perplexity" and "perplexity_2" not in columns:
            name, ratio = ("perplexity", "ppl_x_dense") if "perplexity" not in columns else ("perplexity_2",
                                                                                             "ppl_2_x_dense")
            columns[name] = entry.get(side)
            if entry.get("dense") and entry.get(side) is not None:
                columns[ratio] = entry[side] / entry["dense"]
            if name == "perplexity":
                columns["prefill_tok_s"] = details.get("prefill_tok_s")
        elif entry["metric"] == "lastword" and "lastword_acc" not in columns:
            columns["lastword_acc"] = entry.get(side)
        elif entry["metric"] == "generation" and "rougeL_vs_dense" not in columns:
            columns.update(rougeL_vs_dense=entry.get(side), decode_tok_s=details.get("decode_tok_s"),
                           decode_macs_saved=details.get("decode_macs_saved"))
    return columns


def row_from_report(recipe: Recipe, report: dict[str, Any], peak_mb: float | None) -> dict[str, Any]:
    """The table row of one finished cell: every figure read from its report."""
    timings = report["timings_s"]
    return {"recipe": recipe.name, "target_ratio": recipe.target.ratio, "achieved_ratio": report["achieved_ratio"],
            **_evaluation_columns(report, "compressed"),
            "compress_s": sum(timings.get(k, 0.0) for k in ("calibration data", "score", "allocate", "compress")),
            "peak_rss_mb": peak_mb if peak_mb is not None else report.get("peak_rss_mb")}


def dense_row(report: dict[str, Any]) -> dict[str, Any]:
    row = {"recipe": "dense", "target_ratio": 0.0, "achieved_ratio": 0.0, **_evaluation_columns(report, "dense")}
    row.pop("decode_macs_saved", None)  # no schedule on the dense model
    return row


FORMATS = {"perplexity": ",.2f", "perplexity_2": ",.2f", "ppl_x_dense": ".3f", "ppl_2_x_dense": ".3f",
           "target_ratio": "g", "achieved_ratio": ".4f", "lastword_acc": ".3f",
           "rougeL_vs_dense": ".3f", "decode_macs_saved": ".1%"}


def _fmt(value: Any, column: str) -> str:
    if value is None or value == "":
        return "–"
    if column in FORMATS:
        return format(value, FORMATS[column])
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict[str, Any]], output: Path, legend: list[str] | None = None) -> None:
    """bench.csv (every digit) and bench.md (rounded, for people, with ``legend`` lines below)."""
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (output / "bench.csv").write_text(buffer.getvalue())
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|---|" + "---:|" * (len(COLUMNS) - 2)]
    failed = []
    for row in rows:
        if row.get("error"):
            failed.append(row)
        lines.append("| " + " | ".join(_fmt(row.get(c), c) for c in COLUMNS[:-1]) + " |")
    if legend:
        lines += ["", *legend]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {r['recipe']} at {r['target_ratio']:g}: {r['error']}" for r in failed]
    (output / "bench.md").write_text("\n".join(lines) + "\n")


def write_plots(rows: list[dict[str, Any]], plans: dict[tuple[str, float], list[float]], output: Path) -> list[Path]:
    """perplexity.png (perplexity vs ratio per method) and keep_fractions.png (per-layer keep-fractions)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("plots need the plots extra: pip install 'lowrank-kit[plots]'; the table is written without "
                      "them", stacklevel=2)
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next((r for r in rows if r["recipe"] == "dense"), None)
    for name in dict.fromkeys(r["recipe"] for r in rows if r["recipe"] != "dense"):
        points = sorted((r["target_ratio"], r["perplexity"]) for r in rows
                        if r["recipe"] == name and r.get("perplexity") is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    if dense and dense.get("perplexity"):
        ax.axhline(dense["perplexity"], color="black", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (decoder linear weights removed)")
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(output / "perplexity.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    ratios = sorted({ratio for _, ratio in plans})
    if ratios:
        fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), sharey=True, squeeze=False)
        for ax, ratio in zip(axes[0], ratios, strict=True):
            for (name, r), fractions in plans.items():
                if r == ratio and fractions:
                    ax.plot(range(len(fractions)), fractions, label=name)
            ax.set_title(f"ratio {ratio:g}")
            ax.set_xlabel("decoder layer")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("kept fraction of the layer's compressed weights")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        written.append(output / "keep_fractions.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def _finished(folder: Path, recipe: Recipe) -> bool:
    """A cell finished by an earlier (interrupted) bench with exactly this recipe."""
    import yaml

    if not (folder / "report.json").is_file() or not (folder / "recipe.yaml").is_file():
        return False
    return yaml.safe_load((folder / "recipe.yaml").read_text()) == recipe.to_dict()


def run_bench(recipes: list[str | Path], ratios: list[float], output: str | Path,
              overrides: list[str] | None = None, save_models: bool = False, progress: bool = True,
              model: Any = None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """Run the table; returns its rows (dense first). Finished cells in ``output`` are reused."""
    output = Path(output)
    cells = plan_cells(recipes, ratios, output, overrides, save_models)
    if output.is_dir() and any(output.iterdir()) and not (output / "cells").is_dir():
        raise RecipeError("--output", f"'{output}' holds other files; a bench writes only into a new folder or "
                                      "one of its own (to resume it)")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if model is None:
        spec = cells[0].model
        model, tokenizer = load_model(spec.path, spec.gguf_file, spec.dtype)
    pristine = model
    rows: list[dict[str, Any]] = []
    plans: dict[tuple[str, float], list[float]] = {}
    log = output / "bench.log"
    bar = tqdm(cells, desc="bench", unit="cell", disable=not progress)
    previous: Any = None  # the last compressed run, reused by a recipe that differs only in decode
    store = DenseStore()  # dense-model statistics and factorisations, computed once for every cell reading them
    texts = [e.dataset for e in cells[0].evaluate if e.metric == "perplexity"]
    legend = [f"{name}: on {text}" + (" (x_dense: its ratio to the dense model's)" if i == 0 else "")
              for i, (name, text) in enumerate(zip(("perplexity", "perplexity_2"), texts, strict=False))]
    for recipe in bar:
        bar.set_postfix_str(f"{recipe.name} @ {recipe.target.ratio:g}")
        folder = recipe.output_dir()
        saved = folder / "report.json"
        try:
            if _finished(folder, recipe):
                report = json.loads(saved.read_text())
                peak = report.get("bench_peak_rss_mb")
            else:
                engine = Engine(recipe, progress=progress, overwrite=True, store=store, checkpoint=False)
                with PeakMemory() as memory:
                    reusable = recipe.runtime.offload == "none"  # an offloaded model's layers are not all in memory
                    if reusable and previous is not None and previous.run.recipe.decode is None and same_compression(
                            recipe, previous.run.recipe):
                        result = engine.run(reuse=previous)
                    else:
                        previous = result = None  # free the last compressed model before making the next
                        gc.collect()
                        result = engine.run(copy.deepcopy(pristine), tokenizer)
                previous = result
                report, peak = result.report, memory.peak_mb
                report["bench_peak_rss_mb"] = peak
                saved.write_text(json.dumps(report, indent=2))
            if not rows:
                rows.append(dense_row(report))
            rows.append(row_from_report(recipe, report, peak))
            plans[(recipe.name, recipe.target.ratio)] = report.get("layer_fractions", [])
        except Exception as err:  # a failed cell is reported; the rest of the table still runs
            rows.append({"recipe": recipe.name, "target_ratio": recipe.target.ratio,
                         "error": f"{type(err).__name__}: {err}"})
            with log.open("a") as handle:
                handle.write(f"--- {recipe.name} at {recipe.target.ratio:g}\n{traceback.format_exc()}\n")
        write_table(rows, output, legend)
    write_plots(rows, plans, output)
    (output / "bench.json").write_text(json.dumps({
        "recipes": [str(r) for r in recipes], "ratios": ratios, "wall_s": time.perf_counter() - started,
        "shared": {k: to_dict(getattr(cells[0], k)) for k in ("model", "calibration")}, "rows": rows,
    }, indent=2))
    return rows
