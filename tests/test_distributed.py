"""Data-parallel calibration: statistics summed over two processes equal the single-process ones."""

from __future__ import annotations

import torch
from conftest import sample_ids, tiny_model
from lightning.fabric import Fabric

from lowrank_kit.calibration.stats import AbsMean, Gram, Tap
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.pipeline.replay import capture, run_layer


def layer_statistics(windows: torch.Tensor, reduce=None) -> dict[str, torch.Tensor]:
    """Statistics of layer 1's projections over the given windows, as the engine gathers them."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    tap = Tap()
    tap.watch("gram", adapter.projection(1, "down_proj"), Gram())
    tap.watch("absmean", adapter.projection(1, "q_proj"), AbsMean())
    with torch.no_grad():
        for start in range(0, len(windows), 2):
            inputs = capture(model, adapter.layers, windows[start : start + 2])
            hidden = run_layer(adapter.layers[0], inputs, 0)
            inputs.hidden = hidden
            run_layer(adapter.layers[1], inputs, 1)
    stats = tap.close(reduce)
    return {"gram": stats["gram"].matrix, "absmean": stats["absmean"].mean, "count": stats["gram"].count}


def _worker(fabric: Fabric, windows: torch.Tensor) -> dict[str, float]:
    """Each process takes the engine's shard; rank 0 compares the sums with one process's."""
    shard = windows[fabric.global_rank :: fabric.world_size]
    shared = layer_statistics(shard, lambda t: fabric.all_reduce(t, reduce_op="sum"))
    single = layer_statistics(windows)
    # Only small numbers go back: Lightning joins the workers before reading their results.
    return {
        "count": float(shared["count"]),
        "single_count": float(single["count"]),
        "gram_error": float((shared["gram"] - single["gram"]).abs().max() / single["gram"].abs().max()),
        "absmean_error": float((shared["absmean"] - single["absmean"]).abs().max() / single["absmean"].abs().max()),
    }


def test_two_processes_equal_one() -> None:
    windows = sample_ids(n=6, length=24, seed=5)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    result = fabric.launch(_worker, windows)
    assert result["count"] == result["single_count"] == 6 * 24
    assert result["gram_error"] < 1e-12
    assert result["absmean_error"] < 1e-12
