"""The run report: JSON for machines, Markdown for people. Ratios come from the real shapes."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank_kit.models.adapters import PROJECTIONS, ModelAdapter

if TYPE_CHECKING:
    from lowrank_kit.pipeline.state import RunState


def weight_params(module: nn.Module) -> int:
    """Parameters of a (possibly compressed) projection, biases excluded as in the ratio's definition."""
    return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))


def decoder_linear_params(adapter: ModelAdapter) -> int:
    """What the decoder-layer projections hold now, counted from the modules themselves."""
    return sum(
        weight_params(adapter.projection(i, p)) for i in range(adapter.geometry.layers) for p in PROJECTIONS
    )


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux keeps ``ru_maxrss`` across the exec that
    starts a spawned process, so a run started from a larger Python process (a test, a
    benchmark, a data-parallel launch) would report its parent's peak; ``VmHWM`` belongs to the
    process's own address space. ``ru_maxrss`` elsewhere (bytes on macOS, KiB on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss / 1024


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and of the GPU, when one was used)."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


COMMON = ("metric", "dataset", "seq_len", "tokens", "value")


def evaluation_row(dense: dict[str, Any] | None, compressed: dict[str, Any]) -> dict[str, Any]:
    """One report row: the shared description, both values, and metric-specific details."""

    def details(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in COMMON and not k.startswith("_")}

    out = {k: compressed[k] for k in COMMON if k in compressed and k != "value"}
    if dense is not None:
        out["dense"] = dense["value"]
    out["compressed"] = compressed["value"]
    if details(compressed):
        out["details"] = {"dense": details(dense) if dense is not None else {}, "compressed": details(compressed)}
    return out


def generations_jsonl(evaluations: dict[str, list[dict[str, Any]]]) -> str:
    """Prompt, reference, dense and compressed continuation per line, for every generation evaluation."""
    lines = []
    for dense, compressed in zip(evaluations["dense"], evaluations["compressed"], strict=False):
        if "_texts" not in compressed:
            continue
        references = compressed["_references"] or [None] * len(compressed["_texts"])
        for prompt, reference, d, c in zip(compressed["_prompts"], references, dense["_texts"], compressed["_texts"],
                                           strict=True):
            lines.append(json.dumps({"dataset": compressed["dataset"], "prompt": prompt, "reference": reference,
                                     "dense": d, "compressed": c}))
    return "\n".join(lines) + "\n" if lines else ""


def library_versions() -> dict[str, str]:
    """lowrank-kit and the libraries whose versions decide its numbers (reports, --version, resume)."""
    import lightning
    import transformers

    from lowrank_kit import __version__

    return {"lowrank_kit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__}


def environment(device: torch.device, processes: int = 1) -> dict[str, Any]:
    """The versions and the device a report's numbers were measured with."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine() or 'cpu'} CPU, {torch.get_num_threads()} threads"
    return {**library_versions(), "python": platform.python_version(), "device": f"{device.type}: {name}",
            "processes": processes}


def build(run: RunState, dense_params: int, compressed_params: int, evaluations: dict[str, list[dict[str, Any]]],
          timings: dict[str, float]) -> dict[str, Any]:
    recipe = run.recipe
    total = run.geometry.total_linear_params
    kept = decoder_linear_params(run.adapter)
    plan = run.require_plan()
    predicted = plan.notes.get("predicted_loss_per_unit", {})  # allocators that predict each unit's loss
    modules = [
        {"unit": u.name, "kind": u.kind, "transform": u.transform, "rank": plan.rank(u), "max_rank": u.max_rank,
         "dense": u.is_dense(plan.rank(u)),
         "params_dense": u.dense_params, "params_kept": u.params(plan.rank(u)),
         **({"predicted_loss": predicted[u.name]} if u.name in predicted else {})}
        for u in run.units
    ]
    rows = [evaluation_row(d, c) for d, c in zip(evaluations["dense"], evaluations["compressed"], strict=False)]
    if not evaluations["dense"]:
        rows = [evaluation_row(None, c) for c in evaluations["compressed"]]
    return {
        "name": recipe.name,
        "model": recipe.model.path,
        "strategies": {
            "collect": [c.plugin for c in recipe.collect], "score": [c.plugin for c in recipe.score],
            "allocate": recipe.allocate.plugin, "transform": [c.plugin for c in recipe.transform],
            "decode": recipe.decode.plugin if recipe.decode else None,
        },
        "target_ratio": recipe.target.ratio,
        "achieved_ratio": 1.0 - kept / total,
        "decoder_linear_params": {"dense": total, "compressed": kept},
        "model_params": {"dense": dense_params, "compressed": compressed_params},
        "calibration": {"dataset": recipe.calibration_data()["dataset"], "samples": recipe.calibration.samples,
                        "seq_len": recipe.calibration.seq_len, "seed": recipe.calibration.seed},
        "evaluation": rows,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        **peak_memory_mb(),
        "environment": environment(run.fabric.device, run.fabric.world_size),
        "layer_fractions": plan.layer_fractions,
        "modules": modules,
        "notes": run.notes,
    }


def _environment_line(rep: dict[str, Any]) -> list[str]:
    env = rep.get("environment")
    if not env:
        return []
    return [f"- measured with lowrank-kit {env['lowrank_kit']}, torch {env['torch']}, transformers "
            f"{env['transformers']}, lightning {env['lightning']}, Python {env['python']} on {env['device']}"
            + (f" ×{env['processes']} processes" if env.get("processes", 1) > 1 else "")]


def _quantization_lines(facts: dict[str, Any] | None, rep: dict[str, Any]) -> list[str]:
    """The quantisation step: what it quantised, bytes, and perplexity and speed before/after."""
    if not facts:
        return []
    size = facts["parameter_bytes"]
    lines = ["", f"Weights quantised to {facts['method']} ({facts['library']}, {facts['tensors']} tensors): "
                 f"parameters {size['before'] / 1e6:,.1f} MB → {size['after'] / 1e6:,.1f} MB"
                 + (f", model.safetensors {rep['model_file_bytes'] / 1e6:,.1f} MB" if "model_file_bytes" in rep
                    else "") + ".", ""]
    if "speed" in facts or "perplexity" in facts:
        lines += ["| compressed model | before quantising | after |", "|---|---:|---:|"]
        if "perplexity" in facts:
            after = next((r["compressed"] for r in rep["evaluation"] if r["metric"] == "perplexity"), None)
            lines.append(f"| perplexity ({facts['perplexity']['dataset']}) | {facts['perplexity']['before']:.3f} | "
                         + (f"{after:.3f} |" if after is not None else "– |"))
        for key, label in (("prefill_tok_s", "prefill tok/s (1×512)"), ("decode_tok_s", "decode tok/s (32 steps)")):
            if "speed" in facts:
                before, after = facts["speed"]["before"], facts["speed"]["after"]
                if key in before:  # reports before this version timed whole generations instead
                    lines.append(f"| {label} | {before[key]:.1f} | {after[key]:.1f} |")
    return lines


def markdown(rep: dict[str, Any]) -> str:
    """A report a person can read: summary first, per-module ranks last."""
    s = rep["strategies"]
    lines = [
        f"# lowrank-kit report: {rep['name']}",
        "",
        f"- model: `{rep['model']}`",
        f"- strategies: allocate `{s['allocate']}`, transform {', '.join(f'`{t}`' for t in s['transform'])}"
        + (f", score {', '.join(f'`{t}`' for t in s['score'])}" if s["score"] else "")
        + (f", decode `{s['decode']}`" if s["decode"] else ""),
        f"- target ratio {rep['target_ratio']:.3f}, achieved **{rep['achieved_ratio']:.4f}** "
        f"(decoder linear weights {rep['decoder_linear_params']['dense']:,} → "
        f"{rep['decoder_linear_params']['compressed']:,})",
        f"- all parameters {rep['model_params']['dense']:,} → {rep['model_params']['compressed']:,}",
        *_environment_line(rep),
        f"- calibration: {rep['calibration']['dataset']}, {rep['calibration']['samples']}×"
        f"{rep['calibration']['seq_len']} tokens, seed {rep['calibration']['seed']}",
        f"- peak memory: {rep['peak_rss_mb']:,.0f} MB RSS"
        + (f", {rep['peak_gpu_mb']:,.0f} MB GPU" if "peak_gpu_mb" in rep else ""),
        "",
    ]
    if rep["evaluation"]:
        lines += ["| metric | dataset | tokens | dense | compressed |", "|---|---|---:|---:|---:|"]
        for row in rep["evaluation"]:
            dense = f"{row['dense']:.3f}" if "dense" in row else "–"
            compressed = f"{row['compressed']:.3f}"
            lines.append(f"| {row['metric']} | {row['dataset']} | {row['tokens']} | {dense} | {compressed} |")
        lines.append("")
        lines += _generation_table(rep["evaluation"])
    lines += ["| phase | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rep["timings_s"].items()]
    notes = rep.get("notes", {})
    lines += _quantization_lines(notes.get("quantization"), rep)
    if "checkpoint_s" in notes:
        lines += ["", f"Compress includes {notes['checkpoint_s']:.1f} s of writing layer checkpoints (for --resume)."]
    if "resumed" in notes:
        lines += [f"Resumed an interrupted run from decoder layer {notes['resumed']['from_layer']}; the timings "
                  "are this run's only."]
    lines += ["", "## Kept rank per module", ""]
    lines += ["| unit | transform | rank | of | params kept |", "|---|---|---:|---:|---:|"]
    for m in rep["modules"]:
        rank = "dense" if m["dense"] else str(m["rank"])
        lines.append(f"| {m['unit']} | {m['transform']} | {rank} | {m['max_rank']} | "
                     f"{m['params_kept'] / m['params_dense']:.1%} |")
    return "\n".join(lines) + "\n"


def _number(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _generation_table(rows: list[dict[str, Any]]) -> list[str]:
    """Generation details: ROUGE-L, speed, and decode multiply-adds of the low-rank modules."""
    out = []
    for row in rows:
        if row["metric"] != "generation" or "details" not in row:
            continue
        out += [f"Generation on {row['dataset']} (ROUGE-L against the dense model's greedy continuation):", "",
                "| model | ROUGE-L vs dense | ROUGE-L vs reference | prefill tok/s | decode tok/s | "
                "low-rank MACs/token | MACs saved by decode schedule |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label in ("dense", "compressed"):
            d = row["details"][label]
            if not d:
                continue
            out.append(f"| {label} | {row[label]:.3f} | {_number(d.get('rougeL_vs_reference'), '.3f')} | "
                       f"{_number(d.get('prefill_tok_s'), '.1f')} | {_number(d.get('decode_tok_s'), '.1f')} | "
                       f"{d.get('lowrank_decode_macs_per_token', 0):,.0f} | {d.get('decode_macs_saved', 0):.1%} |")
        out.append("")
        out += [f"Decode tok/s of the {label} model not measured: "
                f"{row['details'][label].get('decode_note') or 'no decode step was timed'}.\n"
                for label in ("dense", "compressed")
                if row["details"][label] and row["details"][label].get("decode_tok_s") is None]
    return out
