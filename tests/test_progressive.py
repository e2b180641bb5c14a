"""FLRC's progressive low-rank decoding (ALGORITHMS.md §3b) and the generation evaluation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, sample_ids, tiny_model, tiny_recipe
from torch import nn

from lowrank_kit import compress, load_pretrained
from lowrank_kit.compressed.decoding import install, rank_modules, set_fraction
from lowrank_kit.compressed.modules import LowRankLinear
from lowrank_kit.models.attention import ValueDimAttention, shrink_values
from lowrank_kit.recipe.schema import RecipeError

MIXED = [{"plugin": "headwise_pca"}, {"plugin": "svd_llm", "targets": ["q_proj", "k_proj", "gate_proj", "up_proj",
                                                                        "down_proj"]}]


def compressed(tmp_path: Path, family: str = "llama", **extra) -> object:
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3, transform=MIXED, **extra)
    return compress(recipe, model=tiny_model(family), tokenizer=ByteTokenizer(), progress=False)


def greedy(model: nn.Module, ids: torch.Tensor, new: int = 10) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=257,
                              eos_token_id=None)


def truncated(model: nn.Module, fraction: float) -> nn.Module:
    """A copy with every low-rank module rebuilt at the sliced rank (the §3b definition)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            rank = max(1, int(fraction * module.rank + 1e-6))
            small = LowRankLinear.from_factors(module.a[:, :rank], module.b[:rank], module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, small)
        elif isinstance(module, ValueDimAttention):
            rank = max(1, int(fraction * module.v_head_dim + 1e-6))
            v, o = module.v_proj, module.o_proj
            rows, cols = rank * v.out_features // module.v_head_dim, rank * o.in_features // module.v_head_dim
            new_v = nn.Linear(v.in_features, rows, bias=v.bias is not None)
            new_o = nn.Linear(cols, o.out_features, bias=o.bias is not None)
            with torch.no_grad():
                new_v.weight.copy_(v.weight[:rows])
                new_o.weight.copy_(o.weight[:, :cols])
                if v.bias is not None:
                    new_v.bias.copy_(v.bias[:rows])
                if o.bias is not None:
                    new_o.bias.copy_(o.bias)
            shrink_values(module, new_v, new_o, rank)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_rank_slice_equals_truncated_model(tmp_path: Path, family: str) -> None:
    model = compressed(tmp_path, family).model
    ids = sample_ids(n=2, length=24)
    modules = rank_modules(model)
    assert any(isinstance(m, ValueDimAttention) for m in modules) and any(isinstance(m, LowRankLinear)
                                                                          for m in modules)
    for fraction in (0.5, 0.75):
        set_fraction(modules, fraction)
        with torch.no_grad():
            sliced = model(input_ids=ids, use_cache=False).logits
        set_fraction(modules, 1.0)
        with torch.no_grad():
            expected = truncated(model, fraction)(input_ids=ids, use_cache=False).logits
        assert torch.allclose(sliced, expected, atol=1e-5), fraction


def test_constant_schedule_generates_the_static_tokens(tmp_path: Path) -> None:
    model = compressed(tmp_path).model
    ids = sample_ids(n=2, length=20)
    static = greedy(model, ids)
    decoder = install(model, {"kind": "progressive", "stages": [[0, 1.0]], "floor": 0.5})
    assert torch.equal(greedy(model, ids), static)
    assert [f for _, f in decoder.trace] == [1.0] * 10
    assert [t for t, _ in decoder.trace] == list(range(10))  # prefill makes token 0, step k makes token k


def test_schedule_lowers_the_rank_used_per_step(tmp_path: Path) -> None:
    model = compressed(tmp_path).model
    decoder = install(model, {"kind": "progressive", "stages": [[0, 1.0], [3, 0.75], [6, 0.4]], "floor": 0.5})
    greedy(model, sample_ids(n=1, length=16), new=9)
    assert [f for _, f in decoder.trace] == [1.0, 1.0, 1.0, 0.75, 0.75, 0.75, 0.5, 0.5, 0.5]
    low_rank = next(m for m in decoder.modules if isinstance(m, LowRankLinear))
    assert low_rank.active_rank == max(1, int(0.5 * low_rank.rank))  # the floor, not 0.4
    with torch.no_grad():  # a new prompt starts at the allocated rank again
        model(input_ids=sample_ids(n=1, length=8), use_cache=False)
    assert low_rank.active_rank is None and decoder.trace == [(0, 1.0)]


def test_progressive_survives_save_and_load(tmp_path: Path) -> None:
    decode = {"plugin": "progressive", "stages": [[0, 1.0], [3, 0.6]], "floor": 0.5}
    result = compressed(tmp_path, decode=decode)
    ids = sample_ids(n=2, length=20)
    before = greedy(result.model, ids, new=12)
    reloaded = load_pretrained(result.output_dir)
    assert reloaded.lowrank_decoder.spec() == {"kind": "progressive", "stages": [[0, 1.0], [3, 0.6]], "floor": 0.5}
    assert torch.equal(greedy(reloaded, ids, new=12), before)
    assert reloaded.lowrank_decoder.trace == result.model.lowrank_decoder.trace
    assert min(f for _, f in reloaded.lowrank_decoder.trace) == 0.6


def test_generation_evaluation_reports_rouge_and_saved_macs(tmp_path: Path) -> None:
    generation = {"metric": "generation", "dataset": "austen-persuasion", "prompts": 4, "prompt_len": 32,
                  "new_tokens": 8, "batch_size": 2}
    decode = {"plugin": "progressive", "stages": [[0, 1.0], [3, 0.5]], "floor": 0.5}
    result = compressed(tmp_path, decode=decode, evaluate=[generation])
    (row,) = result.report["evaluation"]
    assert row["dense"] == 1.0 and 0.0 <= row["compressed"] <= 1.0
    details = row["details"]["compressed"]
    assert details["decode_tok_s"] > 0 and details["rougeL_vs_reference"] is not None
    # 7 decode steps: 2 at the allocated rank, 5 at half of it (rounded down per module).
    assert details["decode_macs_saved"] == pytest.approx(5 / 7 * 0.5, abs=0.05)
    assert row["details"]["dense"]["lowrank_decode_macs_per_token"] == 0
    lines = (result.output_dir / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == {"dataset", "prompt", "reference", "dense", "compressed"}
    assert "ROUGE-L vs dense" in (result.output_dir / "report.md").read_text()


def test_generation_from_jsonl_prompts(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Chapter {i}. It was", "reference": "a fine day"})
                              for i in range(3)))
    generation = {"metric": "generation", "dataset": str(data), "new_tokens": 5, "batch_size": 2}
    result = compressed(tmp_path, evaluate=[generation])
    (row,) = result.report["evaluation"]
    assert row["details"]["compressed"]["decode_macs_saved"] == 0.0  # no decode schedule: static ranks
    assert row["details"]["compressed"]["rougeL_vs_reference"] is not None
    assert len((result.output_dir / "generations.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(("stages", "message"), [
    ([[0, 1.0], [8, 0.9], [4, 0.8]], "start later"),
    ([[0, 0.8], [8, 0.9]], "keep no more"),
    ([[0, 1.5]], "in \\(0, 1\\]"),
    ([[0.5, 1.0]], "integer"),
    ([], "at least one"),
])
def test_bad_schedules_are_located_errors(tmp_path: Path, stages: list, message: str) -> None:
    from lowrank_kit.recipe.loading import from_raw

    recipe = tiny_recipe(tmp_path, decode={"plugin": "progressive", "stages": stages})
    with pytest.raises(RecipeError, match=message) as err:
        from_raw(recipe)
    assert err.value.path.startswith("decode.stages")
