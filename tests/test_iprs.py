"""IPRS (FLAT-LLM §1c): angular importance and the capped proportional allocation."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ByteTokenizer, tiny_model, tiny_recipe
from lowrank_kit_plugins.headwise_pca import HeadwisePca
from lowrank_kit_plugins.iprs import Iprs, iprs_fractions
from lowrank_kit_plugins.nystrom import Nystrom
from test_plan import SMOLLM2

from lowrank_kit import compress
from lowrank_kit.compressed.plan import achieved_ratio


def test_fractions_are_proportional_and_sum_to_the_budget() -> None:
    fractions = iprs_fractions([1.0, 2.0, 3.0, 4.0], 2.0)
    assert fractions == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert sum(fractions) == pytest.approx(2.0)


def test_cap_redistributes_the_excess() -> None:
    fractions = iprs_fractions([1.0, 1.0, 10.0], 2.0)  # 10/12·2 > 1: capped, the rest split evenly
    assert fractions == pytest.approx([0.5, 0.5, 1.0])
    fractions = iprs_fractions([1.0, 2.0, 4.0, 30.0, 30.0], 3.5)
    assert max(fractions) <= 1.0 and sum(fractions) == pytest.approx(3.5)
    assert fractions[3] == fractions[4] == 1.0 and fractions[:3] == pytest.approx([1.5 / 7 * x for x in (1, 2, 4)])


def test_order_follows_scores_and_no_minimum() -> None:
    rng = random.Random(0)
    scores = [rng.random() for _ in range(30)]
    fractions = iprs_fractions(scores, 12.0)
    order = sorted(range(30), key=scores.__getitem__)
    assert [fractions[i] for i in order] == sorted(fractions)
    assert min(fractions) < 0.1  # the least important layer is not floored


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_achieved_ratio_within_one_percent_on_smollm2_shapes(ratio: float) -> None:
    run = SimpleNamespace(geometry=SMOLLM2, target_ratio=ratio,
                          scores={f"layers.{i}": 1.0 + (i % 7) * 0.3 for i in range(SMOLLM2.layers)})
    units = HeadwisePca(targets=("v_proj", "o_proj")).lowrank_units(run) + Nystrom().lowrank_units(run)
    plan = Iprs().lowrank_allocate(run, units)
    achieved = achieved_ratio(plan, units, SMOLLM2.total_linear_params)
    assert achieved >= ratio and abs(achieved - ratio) <= 0.01 * ratio
    fractions = plan.layer_fractions
    assert max(fractions) <= 1.0
    assert fractions[6] > fractions[0]  # layer 6 scores 2.8, layer 0 scores 1.0


def test_angular_importance_matches_a_direct_computation(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "svd_llm", 0.3, score="angular_importance", allocate="iprs",
                         calibration={"dataset": "austen-emma", "samples": 4, "seq_len": 32, "batch_size": 2})
    model = tiny_model("llama")
    reference = tiny_model("llama")
    result = compress(recipe, model=model, tokenizer=ByteTokenizer(), progress=False)
    windows = result.run.calibration
    with torch.no_grad():
        states = reference(input_ids=windows, output_hidden_states=True).hidden_states
    for layer in range(2):  # hidden_states[3] is after the final norm, not layer 2's raw output
        x, y = states[layer].double(), states[layer + 1].double()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        expected = (torch.arccos(cos.clamp(0, 1)) / torch.pi).sum()
        assert result.run.scores[f"layers.{layer}"] == pytest.approx(float(expected), rel=1e-6)
    assert result.run.plan.allocator == "iprs"
    assert abs(result.report["achieved_ratio"] - 0.3) < 0.03
