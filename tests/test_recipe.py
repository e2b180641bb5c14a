"""Recipe validation: every error located, with a suggestion, before any model is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_kit.recipe.loading import from_raw, load
from lowrank_kit.recipe.schema import RecipeError

RECIPES = Path(__file__).parent.parent / "recipes"

BASE = """\
name: t
model: {path: smollm2-135m}
calibration: {dataset: austen-emma, samples: 4, seq_len: 64}
target: {ratio: 0.2}
allocate: uniform
transform:
  - plugin: svd_llm
    targets: [q_proj, k_proj]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path: Path) -> None:
    recipe = load(path)
    again = from_raw(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()


def test_unknown_key_is_an_error_with_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("samples: 4", "smaples: 4"))
    with pytest.raises(RecipeError) as err:
        load(path)
    text = str(err.value)
    assert "calibration.smaples" in text and "did you mean 'samples'" in text
    assert f"{path}:3:" in text


def test_misspelt_plugin_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        load(write(tmp_path, BASE.replace("plugin: svd_llm", "plugin: svd_lm")))
    text = str(err.value)
    assert "transform[0].plugin" in text and "did you mean 'svd_llm'" in text and ":7:" in text


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_outside_open_interval(tmp_path: Path, ratio: float) -> None:
    with pytest.raises(RecipeError, match=r"target\.ratio: must lie strictly between 0 and 1"):
        load(write(tmp_path, BASE.replace("ratio: 0.2", f"ratio: {ratio}")))


def test_two_transforms_on_one_module(tmp_path: Path) -> None:
    text = BASE + "  - plugin: svd\n    targets: [k_proj, o_proj]\n"
    with pytest.raises(RecipeError) as err:
        load(write(tmp_path, text))
    assert "transform[1].targets" in str(err.value)
    assert "'k_proj' is already taken by transform[0] (svd_llm)" in str(err.value)


def test_bad_target_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"targets\[1\]: 'svd_llm' cannot target 'k_prj'; did you mean 'k_proj'"):
        load(write(tmp_path, BASE.replace("[q_proj, k_proj]", "[q_proj, k_prj]")))
    with pytest.raises(RecipeError, match=r"calibration\.samples: expected an integer"):
        load(write(tmp_path, BASE.replace("samples: 4", "samples: many")))


def test_missing_file_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no recipe file"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=r"calibration\.dataset: no file at"):
        load(write(tmp_path, BASE.replace("austen-emma", "missing.txt")))
    with pytest.raises(RecipeError, match="did you mean 'austen-emma'"):
        load(write(tmp_path, BASE.replace("austen-emma", "austen-ema")))


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert load(path, ["target.ratio=0.35"]).target.ratio == 0.35
    assert load(path, {"transform[0].targets": ["down_proj"]}).transform[0].targets == ["down_proj"]
    with pytest.raises(RecipeError, match="must lie strictly"):
        load(path, ["target.ratio=2"])
    with pytest.raises(RecipeError, match="did you mean 'ratio'"):
        load(path, ["target.ratoi=0.3"])


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    recipe = load(write(tmp_path, BASE))
    data = recipe.to_dict()
    assert data["calibration"]["seed"] == 0 and data["runtime"]["accelerator"] == "auto"
    assert data["allocate"] == {"plugin": "uniform"}


def test_cli_reports_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("ratio: 0.2", "ratio: 1.2"))
    proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "target.ratio" in proc.stderr


def test_recipe_reference_is_up_to_date() -> None:
    from lowrank_kit.recipe.reference import recipe_reference

    doc = Path(__file__).parent.parent / "docs" / "recipes.md"
    assert doc.read_text() == recipe_reference(), "regenerate: python -m lowrank_kit.recipe.reference > docs/recipes.md"


def test_a_gguf_file_beside_a_builtin_alias_is_not_ignored() -> None:
    from lowrank_kit.models.loading import resolve

    with pytest.raises(RecipeError, match=r"model\.gguf_file: built-in model 'smollm2-135m' has one file"):
        resolve("smollm2-135m", "other.gguf")


def test_keyword_sections_keep_none_beside_list_overrides(tmp_path) -> None:
    """A section value None with list overrides is null in the recipe, not the folder name "None"."""
    from lowrank_kit.api import resolve_recipe

    recipe = resolve_recipe("flat_llm", ["target.ratio=0.3"], output={"cache_dir": None, "dir": str(tmp_path / "a b")})
    assert recipe.output.cache_dir is None
    assert recipe.output.dir == str(tmp_path / "a b")
    assert recipe.target.ratio == 0.3
