"""A saved folder is a transformers model: Auto classes, pipeline and save_pretrained after
``import lowrank_kit``; a clear refusal without it, never a dense model with random layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, ByteTokenizer, byte_level_tokenizer, sample_ids, tiny_model, tiny_recipe
from transformers import AutoConfig, AutoModelForCausalLM

import lowrank_kit
from lowrank_kit import compress, load_pretrained
from lowrank_kit.models import hf_classes

# one recipe that leaves every compressed module kind in the folder
KINDS = {"transform": [{"plugin": "headwise_pca", "targets": ["v_proj", "o_proj"]},
                       {"plugin": "svd_llm", "targets": ["q_proj", "k_proj"]},
                       {"plugin": "nystrom", "targets": ["gate_proj", "up_proj", "down_proj"]}]}


def saved(tmp_path: Path, family: str, **extra: Any) -> tuple[Any, Path]:
    result = compress(tiny_recipe(tmp_path, ratio=0.3, **{**KINDS, **extra}), model=tiny_model(family),
                      tokenizer=ByteTokenizer(), progress=False)
    return result.model, result.output_dir


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_classes_load_a_folder_with_the_same_logits(tmp_path: Path, family: str) -> None:
    model, folder = saved(tmp_path, family)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and type(model).__name__.startswith("LowRank")
    assert config["model_type"].endswith(hf_classes.MARK)
    auto = AutoModelForCausalLM.from_pretrained(folder)
    assert type(auto) is type(model) and type(AutoConfig.from_pretrained(folder)) is type(auto.config)
    expected = logits(model)
    assert torch.equal(logits(auto), expected)
    assert torch.equal(logits(load_pretrained(folder)), expected)
    # save_pretrained of the loaded model, and of the in-memory result, round-trip
    auto.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), expected)
    model.save_pretrained(tmp_path / "from-memory")
    assert torch.equal(logits(load_pretrained(tmp_path / "from-memory")), expected)


def test_load_pretrained_takes_dtype_and_device_and_restores_decoding(tmp_path: Path) -> None:
    model, folder = saved(tmp_path, "llama", decode={"plugin": "progressive"})
    loaded = load_pretrained(folder, dtype="bfloat16", device="cpu")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    auto = AutoModelForCausalLM.from_pretrained(folder)
    assert auto.lowrank_decoder.spec() == model.lowrank_decoder.spec()


def test_pipeline_generates_like_generate(tmp_path: Path) -> None:
    from transformers import pipeline

    _, folder = saved(tmp_path, "llama")
    tokenizer = byte_level_tokenizer()
    generate = pipeline("text-generation", model=str(folder), tokenizer=tokenizer, device="cpu")
    text = generate("It is a truth", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    model = load_pretrained(folder)
    ids = tokenizer("It is a truth", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=257)
    assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_legacy_folder_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_classes, "as_compressed", lambda model: False)  # as for a family with no class
    model, folder = saved(tmp_path, "llama")
    assert json.loads((folder / "config.json").read_text())["lowrank"]["format"] == 2
    assert torch.equal(logits(load_pretrained(folder)), logits(model))


WITHOUT_IMPORT = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM, pipeline
    for call in (lambda: AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                 lambda: AutoModelForCausalLM.from_pretrained(sys.argv[1], ignore_mismatched_sizes=True),
                 lambda: pipeline("text-generation", model=sys.argv[1])):
        try:
            call()
        except Exception as err:
            print("REFUSED:", err)
        else:
            print("LOADED")
    assert "lowrank_kit" not in sys.modules
""")


def test_without_the_import_transformers_refuses_and_says_why(tmp_path: Path) -> None:
    _, folder = saved(tmp_path, "llama")
    out = subprocess.run([sys.executable, "-c", WITHOUT_IMPORT, str(folder)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    assert len(lines) == 3 and all("pip install lowrank-kit and import lowrank_kit" in line for line in lines), lines


def test_the_classes_are_registered_by_the_import() -> None:
    assert lowrank_kit.__version__
    for base in hf_classes.FAMILIES:
        config_cls, model_cls = hf_classes.classes(base)
        assert AutoConfig.for_model(config_cls.model_type).__class__ is config_cls
        assert model_cls.config_class is config_cls
        assert hf_classes.base_type(config_cls.model_type) == base
