"""Plugins: a third-party strategy installed through the entry-point group runs from a recipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_kit.extension.manager import registry

DOC = Path(__file__).parent.parent / "docs" / "writing-a-plugin.md"


def files_from_doc() -> dict[str, str]:
    """The code blocks of docs/writing-a-plugin.md that follow a ``<!-- file: NAME -->`` line."""
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", DOC.read_text(), flags=re.S))


RUN = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import ByteTokenizer, tiny_model, tiny_recipe
from pathlib import Path
from lowrank_kit import compress
recipe = tiny_recipe(Path({tmp!r}), "svd_llm", 0.3, allocate={{"plugin": "split_budget", "attention_keep": 0.9}})
result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
print("ALLOCATOR", result.run.plan.allocator, "RATIO", result.report["achieved_ratio"])
unit = next(u for u in result.run.units if u.kind == "q_proj")
print("Q_RANK_OK", result.run.plan.rank(unit) == unit.rank_for_fraction(0.9))
'''


def test_builtins_come_through_the_entry_point_group() -> None:
    reg = registry()
    for point, name in [("transform", "svd"), ("transform", "svd_llm"), ("allocate", "uniform")]:
        assert reg.sources[(point, name)].startswith("lowrank_kit_plugins.")


def test_third_party_plugin_installs_and_runs_from_a_recipe(tmp_path: Path) -> None:
    """The plugin of docs/writing-a-plugin.md, pip-installed, then run from a recipe and listed."""
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    project.mkdir()
    files = files_from_doc()
    assert set(files) == {"split_budget_plugin.py", "pyproject.toml"}
    for name, text in files.items():
        (project / name).write_text(text)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(project)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = RUN.format(tests=str(Path(__file__).parent), tmp=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ALLOCATOR split_budget" in proc.stdout and "Q_RANK_OK True" in proc.stdout
    ratio = float(proc.stdout.split("RATIO ")[1].split()[0])
    assert abs(ratio - 0.3) < 0.03  # tiny matrices: coarse ranks
    listing = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "plugins"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert "split_budget" in listing.stdout and "attention_keep: float = 0.9" in listing.stdout


@pytest.mark.parametrize("body", ["raise ImportError('missing dependency xyz')",
                                  "import sys; sys.exit('missing dependency xyz')"])
def test_a_broken_plugin_warns_instead_of_crashing(tmp_path: Path, body: str) -> None:
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lowrank_kit]\nbroken = broken_plugin_module\n")
    (site / "broken_plugin_module.py").write_text(body + "\n")
    proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "plugins"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0
    assert "broken" in proc.stderr and "missing dependency xyz" in proc.stderr
    assert "svd_llm" in proc.stdout


def test_a_misspelt_hook_is_an_error_not_a_silent_no_op() -> None:
    from lowrank_kit.extend import Strategy, hookimpl
    from lowrank_kit.extension.manager import run_manager, unknown_hooks

    class Typo(Strategy):
        name, point, description = "typo", "transform", "test"

        @hookimpl
        def lowrank_tranform(self, run, layer):  # misspelt: would never run
            raise AssertionError

    with pytest.raises(TypeError, match=r"lowrank_tranform.*did you mean 'lowrank_transform'"):
        run_manager([Typo()])
    assert unknown_hooks(Typo) == ["lowrank_tranform"]  # what registry() skips, with a warning naming it


def test_hooks_run_in_recipe_order() -> None:
    from lowrank_kit.extend import Strategy, hookimpl
    from lowrank_kit.extension.manager import run_manager

    calls: list[str] = []

    def transform(label: str) -> Strategy:
        class Recorder(Strategy):
            name, point, description = label, "transform", "test"

            @hookimpl
            def lowrank_transform(self, run, layer):
                calls.append(label)

        return Recorder()

    run_manager([transform("first"), transform("second"), transform("third")]).hook.lowrank_transform(
        run=None, layer=0)
    assert calls == ["first", "second", "third"]


def test_an_allocator_without_its_score_level_is_a_located_recipe_error(tmp_path: Path) -> None:
    from conftest import tiny_recipe

    from lowrank_kit.recipe.loading import from_raw
    from lowrank_kit.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match=r"allocate: 'fisher' allocates from per-projection importances, which "
                                          r"score 'angular_importance' \(per-layer importances\) does not give; "
                                          r"use score: fisher"):
        from_raw(tiny_recipe(tmp_path, allocate="fisher", score="angular_importance"))
    with pytest.raises(RecipeError, match="'iprs' allocates from per-layer importances, which no score strategy "
                                          "gives; use score: angular_importance"):
        from_raw(tiny_recipe(tmp_path, allocate="iprs"))
    from_raw(tiny_recipe(tmp_path, allocate="fisher", score="fisher"))  # the matching pair is fine
