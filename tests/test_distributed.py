"""Data-parallel calibration: statistics summed over two processes equal the single-process ones,
and a 2-process command-line run saves the 1-process model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import sample_ids, tiny_model
from lightning.fabric import Fabric
from safetensors.torch import load_file

from lowrank_kit.calibration.stats import AbsMean, Gram, Tap
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.pipeline.replay import capture, run_layer
from lowrank_kit.testing import byte_level_tokenizer


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
    # Products of a block of tokens are float32 (calibration.stats.GRAM_BLOCK) and the shards'
    # blocks hold other windows than one process's, so the Grams agree to float32 rounding; a
    # wrong reduction (a mean, a missing shard) would be off by O(1).
    assert result["gram_error"] < 1e-6
    assert result["absmean_error"] < 1e-12


TWO_PROCESS_RECIPES = {
    # FLAT-LLM's parts: angular scores, sequential statistics of compressed predecessors.
    "flat": {"score": "angular_importance", "allocate": "iprs",
             "transform": [{"plugin": "headwise_pca", "targets": ["v_proj", "o_proj"]},
                           {"plugin": "nystrom", "targets": ["gate_proj", "up_proj", "down_proj"]}]},
    # FLRC's: Fisher sums of squared batch gradients, dense-input whitening statistics.
    "fisher": {"score": "fisher", "allocate": "fisher", "calibration.pipeline": "dense_input",
               "transform": [{"plugin": "svd_llm"}]},
}


def _cli_run(tmp_path: Path, recipe: dict, name: str, devices: int) -> Path:
    """``lowrank-kit compress`` in a fresh process with ``runtime.devices``; the saved folder."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "compress", str(path), "--quiet",
                           "--set", f"runtime.devices={devices}", "--set", f"name={name}-{devices}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return tmp_path / "out" / f"{name}-{devices}"


@pytest.mark.parametrize("kind", sorted(TWO_PROCESS_RECIPES))
def test_two_process_cli_run_saves_the_one_process_model(tmp_path: Path, kind: str) -> None:
    """A real 2-process run (gloo on the CPU) saves the model and report one process would."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    recipe = {
        "name": kind, "model": {"path": str(folder)},
        "calibration": {"dataset": "austen-emma", "samples": 8, "seq_len": 64, "seed": 0, "batch_size": 2},
        "target": {"ratio": 0.3},
        "evaluate": [{"metric": "perplexity", "dataset": "austen-persuasion", "seq_len": 64, "max_tokens": 1024}],
        "runtime": {"accelerator": "cpu"},
        "output": {"dir": str(tmp_path / "out" / "{name}"), "cache_dir": None},
    }
    for key, value in TWO_PROCESS_RECIPES[kind].items():
        section, _, field = key.partition(".")
        if field:
            recipe[section] = {**recipe[section], field: value}
        else:
            recipe[key] = value
    one, two = (_cli_run(tmp_path, recipe, kind, devices) for devices in (1, 2))
    report_one = json.loads((one / "report.json").read_text())
    report_two = json.loads((two / "report.json").read_text())
    assert report_two["environment"]["processes"] == 2
    assert report_two["achieved_ratio"] == pytest.approx(report_one["achieved_ratio"], rel=1e-6)
    ppl_one, ppl_two = (r["evaluation"][0]["compressed"] for r in (report_one, report_two))
    assert ppl_two == pytest.approx(ppl_one, rel=1e-4)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key, tensor in weights_one.items():
        assert weights_two[key].shape == tensor.shape, key
        assert torch.allclose(weights_two[key], tensor, rtol=1e-4, atol=1e-5), key
