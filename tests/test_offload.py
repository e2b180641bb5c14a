"""Layer-wise onloading (``runtime.offload``): the same numbers as without it, bit for bit on the
CPU, with the disk mode's layers read lazily from a saved folder and written back as shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ByteTokenizer, tiny_recipe
from test_resume import RECIPES as RESUMED

from lowrank_kit.api import compress
from lowrank_kit.models.offload import INDEX, Offloader, WeightFiles, write_dense
from lowrank_kit.persistence.saving import load_pretrained
from lowrank_kit.recipe.schema import RecipeError
from lowrank_kit.testing import byte_level_tokenizer, sample_ids, tiny_model

RECIPES: dict[str, dict[str, Any]] = {
    # sequential statistics and a forward-only score (FLAT-LLM's shape)
    "flat": RESUMED["flat"],
    # a backward-pass score and the dense model's statistics (FLRC's shape)
    "fisher": {"calibration": {"dataset": "austen-emma", "samples": 8, "seq_len": 64, "seed": 0, "batch_size": 4,
                               "pipeline": "dense_input"},
               "score": "fisher", "allocate": "fisher", "transform": [{"plugin": "svd_llm"}]},
    # error curves on the dense model before allocating
    "budget": {"score": "output_gradient", "allocate": "error_budget",
               "transform": [{"plugin": "headwise_pca", "targets": ["v_proj", "o_proj"]},
                             {"plugin": "nystrom", "targets": ["gate_proj", "up_proj", "down_proj"]}]},
}


def _run(tmp_path: Path, kind: str, offload: str, family: str = "llama", model: Any = None) -> Any:
    """``offload``: a mode, or ``spill`` (disk, and every calibration activation spilled to files)."""
    raw = tiny_recipe(tmp_path, ratio=0.3, **RECIPES[kind])
    raw["output"]["dir"] = str(tmp_path / f"{kind}-{offload}")
    raw["output"]["cache_dir"] = str(tmp_path / f"cache-{offload}")  # every pass runs offloaded, none from a cache
    raw["runtime"]["offload"] = "disk" if offload == "spill" else offload
    if offload == "spill":
        raw["runtime"]["inputs_memory_mb"] = 0
    given = {"model": tiny_model(family), "tokenizer": ByteTokenizer()} if model is None else {}
    if model is not None:
        raw["model"]["path"] = str(model)
    return compress(raw, progress=False, **given)


@pytest.mark.parametrize("kind", list(RECIPES))
def test_offloading_gives_the_same_model_bit_for_bit(tmp_path: Path, kind: str) -> None:
    ids = sample_ids()
    modes = ("none", "cpu", "disk", "spill") if kind == "flat" else ("none", "disk", "spill")  # cpu: hooks only here
    results = {mode: _run(tmp_path, kind, mode) for mode in modes}
    reference = results["none"]
    logits = reference.model(ids).logits
    for mode in modes[1:]:
        result = results[mode]
        assert result.report["achieved_ratio"] == reference.report["achieved_ratio"]
        assert [r["compressed"] for r in result.report["evaluation"]] == \
               [r["compressed"] for r in reference.report["evaluation"]]
        assert torch.equal(result.model(ids).logits, logits), mode  # the returned model works too
        assert torch.equal(load_pretrained(result.output_dir)(ids).logits, logits), mode
    disk = results["disk"].output_dir
    assert (disk / INDEX).is_file() and not (disk / "model.safetensors").exists()
    assert not any(p.name.startswith(".") for p in disk.parent.iterdir())  # no working folder left
    assert results["spill"].report["notes"]["inputs_spilled_mb"] > 0
    assert results["disk"].report["notes"]["offload"]["layer_reads"] > 0


def test_disk_reads_a_saved_folder_lazily_and_matches(tmp_path: Path) -> None:
    folder = tmp_path / "dense"
    tiny_model("gemma3").save_pretrained(folder)  # sliding-window layers, a tied head, real rotary buffers
    byte_level_tokenizer().save_pretrained(folder)
    runs = {mode: _run(tmp_path, "flat", mode, model=folder) for mode in ("none", "disk")}
    ids = sample_ids()
    assert torch.equal(runs["disk"].model(ids).logits, runs["none"].model(ids).logits)
    assert [r["compressed"] for r in runs["disk"].report["evaluation"]] == \
           [r["compressed"] for r in runs["none"].report["evaluation"]]


def test_a_layer_off_the_device_holds_no_weights(tmp_path: Path) -> None:
    model = tiny_model("llama")
    layers = model.model.layers
    expected = model(sample_ids()).logits
    source = write_dense(model, layers, tmp_path / "dense")
    assert all(p.is_meta for p in layers.parameters())
    assert not any(p.is_meta for name, p in model.named_parameters() if ".layers." not in name)
    offload = Offloader(model, layers, torch.device("cpu"), "disk", tmp_path / "work", source)
    assert torch.equal(model(sample_ids()).logits, expected)
    assert all(p.is_meta for p in layers.parameters())  # every layer went back out after its forward
    assert offload.loads == len(layers)
    with offload.layer(0, changed=True) as layer, torch.no_grad():
        layer.mlp.down_proj.weight.mul_(0)
    assert (tmp_path / "work" / "layers" / "000" / "layer.safetensors").is_file()
    with offload.layer(0) as layer:
        assert not layer.mlp.down_proj.weight.any()  # read back from its own file, not the dense one
    assert isinstance(WeightFiles(tmp_path / "dense").read(["model.layers.1.mlp.up_proj.weight"], torch.float32)
                      ["model.layers.1.mlp.up_proj.weight"], torch.Tensor)


def test_unsupported_combinations_are_refused_before_any_work(tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, **RECIPES["flat"])
    raw["runtime"]["offload"] = "disk"
    raw["output"]["save_model"] = False
    with pytest.raises(RecipeError, match=r"output\.save_model"):
        compress(raw, progress=False, model=tiny_model("llama"), tokenizer=ByteTokenizer())
    raw = tiny_recipe(tmp_path, **RECIPES["flat"])
    raw["runtime"]["offload"] = "cloud"
    with pytest.raises(RecipeError, match=r"runtime\.offload"):
        compress(raw, progress=False, model=tiny_model("llama"), tokenizer=ByteTokenizer())


@pytest.mark.parametrize("tied", [False, True])
def test_eval_reads_a_saved_model_layer_by_layer(tmp_path: Path, tied: bool) -> None:
    """``lowrank-kit eval FOLDER --offload-disk``: the saved compressed model, lazily, same perplexity;
    also with tied embeddings (SmolLM2's), which the saved file holds under the head's name only."""
    import subprocess
    import sys

    folder = tmp_path / "dense"
    dense = tiny_model("llama")
    if tied:
        dense.config.tie_word_embeddings = True
        dense.tie_weights()
    dense.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    run = _run(tmp_path, "flat", "none", model=folder)
    printed = []
    for extra in ([], ["--offload-disk"]):
        proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "eval", str(run.output_dir), "--seq-len", "64",
                               "--max-tokens", "512", *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        printed.append(proc.stdout.strip().rsplit(":", 1)[1])
    assert printed[0] == printed[1]
    assert float(printed[0]) == pytest.approx(run.report["evaluation"][0]["compressed"], rel=1e-5)
