"""int8 weight-only quantisation after the low-rank step: every decoder weight (low-rank factors
included) and the embedding, saved as plain safetensors, reloaded with equal logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe
from transformers import AutoModelForCausalLM

from lowrank_kit import compress, load_pretrained
from lowrank_kit.compressed import quantization
from lowrank_kit.compressed.modules import LowRankLinear
from lowrank_kit.recipe.loading import load
from lowrank_kit.recipe.schema import RecipeError

KINDS = {"transform": [{"plugin": "headwise_pca", "targets": ["v_proj", "o_proj"]},
                       {"plugin": "svd_llm", "targets": ["q_proj", "k_proj"]},
                       {"plugin": "nystrom", "targets": ["gate_proj", "up_proj", "down_proj"]}]}


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


def run(tmp_path: Path, name: str, **extra: Any) -> Any:
    raw = tiny_recipe(tmp_path, ratio=0.3, **{**KINDS, **extra})
    raw["output"]["dir"] = str(tmp_path / name)
    return compress(raw, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)


def test_int8_quantises_every_decoder_weight_and_reloads_exactly(tmp_path: Path) -> None:
    plain = run(tmp_path, "plain")
    result = run(tmp_path, "int8", quantize={"weights": "int8"})
    model = result.model
    for layer in model.model.layers:
        for module in layer.modules():
            for name, param in module.named_parameters(recurse=False):
                assert quantization.is_quantized(param) == (param.dim() == 2), (type(module).__name__, name)
    assert any(isinstance(m, LowRankLinear) and quantization.is_quantized(m.a) and quantization.is_quantized(m.b)
               for m in model.modules())
    assert quantization.is_quantized(model.get_input_embeddings().weight)
    assert not model.config.tie_word_embeddings and not quantization.is_quantized(model.lm_head.weight)
    expected = logits(model)
    assert torch.equal(logits(load_pretrained(result.output_dir)), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(result.output_dir)), expected)
    # close to the unquantised compressed model, and much smaller on disk
    relative = (expected - logits(plain.model)).norm() / logits(plain.model).norm()
    assert relative < 0.05
    sizes = {name: (r.output_dir / "model.safetensors").stat().st_size for name, r in (("plain", plain),
                                                                                        ("int8", result))}
    assert sizes["int8"] < 0.5 * sizes["plain"]
    assert result.report["model_file_bytes"] == sizes["int8"]
    facts = result.report["notes"]["quantization"]
    assert facts["parameter_bytes"]["after"] < 0.5 * facts["parameter_bytes"]["before"]
    assert facts["perplexity"]["before"] == pytest.approx(plain.report["evaluation"][0]["compressed"], rel=1e-6)
    assert set(facts["speed"]["before"]) == {"prefill_tok_s", "decode_tok_s"}
    assert "before quantising" in (result.output_dir / "report.md").read_text()
    assert json.loads((result.output_dir / "config.json").read_text())["lowrank"]["quantization"]["weights"] == "int8"


def test_int8_rank_slices_follow_the_unquantised_model(tmp_path: Path) -> None:
    from lowrank_kit.compressed.decoding import rank_modules, set_fraction

    decode = {"plugin": "progressive", "stages": [[0, 1.0], [3, 0.6]], "floor": 0.5}
    plain = run(tmp_path, "plain", decode=decode).model
    model = load_pretrained(run(tmp_path, "int8", quantize={"weights": "int8", "compare": False},
                                decode=decode).output_dir)
    for fraction in (1.0, 0.6):  # the sliced int8 factors behave like the sliced float ones
        set_fraction(rank_modules(plain), fraction)
        set_fraction(rank_modules(model), fraction)
        expected = logits(plain)
        assert (logits(model) - expected).norm() / expected.norm() < 0.05, fraction
    set_fraction(rank_modules(model), 1.0)
    model.generate(sample_ids(1, 16), max_new_tokens=8, do_sample=False, pad_token_id=257)
    assert [f for _, f in model.lowrank_decoder.trace][-1] == 0.6


def test_quantisation_without_torchao_is_a_located_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(RecipeError, match=r"quantize\.weights: weight quantisation needs torchao.*\[quant\]"):
        load("flat_llm", ["quantize.weights=int8"])


def test_a_tied_embedding_is_saved_once_and_reloads_tied(tmp_path: Path) -> None:
    from safetensors import safe_open

    from lowrank_kit.testing import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    raw = tiny_recipe(tmp_path, ratio=0.3, **KINDS, quantize={"weights": "int8", "compare": False})
    result = compress(raw, model=model, tokenizer=ByteTokenizer(), progress=False)
    assert result.model.lm_head.weight is result.model.get_input_embeddings().weight
    with safe_open(str(result.output_dir / "model.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if k.startswith("lm_head")]  # noqa: SIM118
    reloaded = load_pretrained(result.output_dir)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert torch.equal(logits(reloaded), logits(result.model))


def test_int8_headwise_query_key_factors_reload_exactly(tmp_path: Path) -> None:
    """q/k head-wise PCA: the r×d factor becomes int8, the small per-head [H, d_h, r] one stays float."""
    from lowrank_kit.compressed.modules import HeadwiseLowRank

    raw = tiny_recipe(tmp_path, "headwise_pca", 0.3, quantize={"weights": "int8"},
                      transform=[{"plugin": "headwise_pca", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}])
    result = compress(raw, model=tiny_model("qwen2"), tokenizer=ByteTokenizer(), progress=False)
    found = [m for m in result.model.modules() if isinstance(m, HeadwiseLowRank)]
    assert found and all(quantization.is_quantized(m.b) and not quantization.is_quantized(m.a) for m in found)
    assert torch.equal(logits(load_pretrained(result.output_dir)), logits(result.model))
