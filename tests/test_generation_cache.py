"""Cached generation equals uncached generation for every compressed module kind and family.

These tests are what a transformers release can break without any error of its own (5.24
renamed the forward's cache keyword and value-dim attention silently ignored the cache), so
they carry the ``generation`` marker: ``scripts/check_newest_transformers.sh`` runs them against
the newest transformers on PyPI as well as the locked one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, ByteTokenizer, sample_ids, tiny_model, tiny_recipe
from torch import nn

from lowrank_kit import compress
from lowrank_kit.compressed.modules import LowRankLinear, ResizedLinear
from lowrank_kit.evaluation.generation import generate_continuations
from lowrank_kit.models import hf_compat
from lowrank_kit.models.attention import ValueDimAttention, shrink_values

pytestmark = pytest.mark.generation

# One transform per compressed module kind, each checked to have produced its module.
KINDS = {
    "low_rank_linear": ([{"plugin": "svd_llm"}], LowRankLinear, 0.3),
    "value_dim_attention": ([{"plugin": "headwise_pca"}], ValueDimAttention, 0.1),
    "resized_mlp": ([{"plugin": "nystrom"}], ResizedLinear, 0.3),
}
NEW = 10  # past Gemma3's tiny sliding window (8), so the sliding cache is exercised too


def uncached_greedy(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_generation_equals_uncached(tmp_path: Path, family: str, kind: str) -> None:
    transform, module_type, ratio = KINDS[kind]
    recipe = tiny_recipe(tmp_path, transform[0]["plugin"], ratio, transform=transform, evaluate=[])
    model = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer()).model
    assert any(isinstance(m, module_type) for m in model.modules())
    prompt = sample_ids(n=1, length=12, seed=9)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=NEW, do_sample=False, use_cache=True, pad_token_id=257,
                                eos_token_id=None)
    assert torch.equal(cached, uncached_greedy(model, prompt, NEW))


def test_an_unknown_cache_keyword_is_refused() -> None:
    class FutureAttention(nn.Module):
        def forward(self, hidden_states: torch.Tensor, kv_state: object = None) -> torch.Tensor:
            return hidden_states

    with pytest.raises(hf_compat.UnsupportedTransformers, match=r"FutureAttention.*kv_state.*tested with"):
        shrink_values(FutureAttention(), nn.Linear(4, 2), nn.Linear(2, 4), 1)


def test_a_cache_ignored_during_generation_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 5.24 failure mode (value-dim attention dropping the cache) must stop, not report garbage."""
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.1, evaluate=[])
    model = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer()).model
    prompt = sample_ids(n=1, length=12, seed=9).tolist()
    _, meter = generate_continuations(model, ByteTokenizer(), prompt, 6, 1)
    assert meter.decode_tokens == 5 and meter.note is None  # the first new token comes from the prefill
    pop = hf_compat.pop_cache
    monkeypatch.setattr(hf_compat, "pop_cache", lambda kwargs: pop(kwargs) and None)  # found, then dropped
    with pytest.raises(hf_compat.UnsupportedTransformers, match="stayed empty"):
        generate_continuations(model, ByteTokenizer(), prompt, 6, 1)


def test_unmeasured_decode_speed_says_why() -> None:
    model = tiny_model("llama")
    _, meter = generate_continuations(model, ByteTokenizer(), sample_ids(n=1, length=12).tolist(), 1, 1)
    assert meter.decode_tokens == 0 and "first token" in meter.note


def test_the_tested_range_is_the_declared_one() -> None:
    """pyproject.toml's transformers range and hf_compat's tested range say the same thing."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = next(Requirement(r).specifier for r in project["dependencies"] if r.startswith("transformers"))
    assert {(s.operator, Version(s.version)) for s in declared} == {
        (">=", hf_compat.TESTED_FROM), ("<", hf_compat.TESTED_BELOW)}


@pytest.mark.parametrize("one_thread", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_one_query_attention_equals_sdpa(monkeypatch: pytest.MonkeyPatch, one_thread: bool, mask: str) -> None:
    """The decoding path of value-dim attention computes what SDPA computes, on one thread or all."""
    from torch.nn import functional as F

    from lowrank_kit.compressed import modules
    from lowrank_kit.models import attention

    monkeypatch.setattr(modules, "THREADS_SLEEP", True)
    monkeypatch.setattr(attention, "ONE_THREAD_MACS", 10**12 if one_thread else 0)
    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(2, 6, 1, 8, generator=generator), torch.randn(2, 2, 11, 8, generator=generator)
    value = torch.randn(2, 2, 11, 5, generator=generator)
    keep = torch.ones(2, 1, 1, 13, dtype=torch.bool)  # longer than the keys, as transformers' masks may be
    keep[0, ..., :4] = False  # a left-padded row
    given = {"none": None, "bool": keep,
             "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask]
    got = attention._one_query(query, key, value, given, 0.3)
    expected = F.scaled_dot_product_attention(query, key, value, None if given is None else keep[..., :11],
                                              scale=0.3, enable_gqa=True)
    assert got.shape == (2, 1, 6, 5)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == threads  # put back after a one-thread call


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_decoding_equals_a_full_forward(tmp_path: Path, family: str) -> None:
    """A left-padded batch, one cached step: the step's logits equal those of a full forward."""
    recipe = tiny_recipe(tmp_path, "headwise_pca", 0.1, evaluate=[])
    model = compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer()).model
    ids = sample_ids(n=2, length=13, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = {hf_compat.cache_keyword(type(model)): hf_compat.output_cache(prefill)}
        step = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **cache).logits[:, -1]
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
