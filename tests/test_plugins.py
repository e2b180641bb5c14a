"""Plugins: a third-party strategy installed through the entry-point group runs from a recipe."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowrank_kit.strategy import registry

PLUGIN = '''
"""A third-party allocator: keeps MLP projections whole-er than attention ones."""
from dataclasses import dataclass
from lowrank_kit import Strategy, hookimpl
from lowrank_kit.plan import RankPlan


@dataclass
class Args:
    attention_fraction: float = 0.5


class HalfAttention(Strategy):
    name = "half_attention"
    point = "allocate"
    description = "Attention keeps attention_fraction of its parameters; the MLP stays dense."
    Args = Args

    @hookimpl
    def lowrank_allocate(self, run, units):
        ranks = {u.name: u.rank_for_fraction(self.args.attention_fraction if u.kind.endswith(("q_proj", "o_proj"))
                                             else 1.0) for u in units}
        return RankPlan(ranks=ranks, allocator=self.name)


@hookimpl
def lowrank_register(registry):
    registry.add(HalfAttention)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "lowrank-kit-half-attention"
version = "0.0.1"

[project.entry-points.lowrank_kit]
half_attention = "half_attention_plugin"

[tool.setuptools]
py-modules = ["half_attention_plugin"]
'''

RUN = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import ByteTokenizer, tiny_model, tiny_recipe
from pathlib import Path
from lowrank_kit import compress
recipe = tiny_recipe(Path({tmp!r}), "svd", 0.2, allocate={{"plugin": "half_attention", "attention_fraction": 0.25}})
result = compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
print("RATIO", result.report["achieved_ratio"], "ALLOCATOR", result.run.plan.allocator)
print("KINDS", sorted({{m["kind"] for m in result.report["modules"] if not m["dense"]}}))
'''


def test_builtins_come_through_the_entry_point_group() -> None:
    reg = registry()
    for point, name in [("transform", "svd"), ("transform", "svd_llm"), ("allocate", "uniform")]:
        assert reg.sources[(point, name)].startswith("lowrank_kit_plugins.")


def test_third_party_plugin_installs_and_runs_from_a_recipe(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    project.mkdir()
    (project / "half_attention_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (project / "pyproject.toml").write_text(PYPROJECT)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(project)], check=True, timeout=300)
    tests = str(Path(__file__).parent)
    code = RUN.format(tests=tests, tmp=str(tmp_path / "run"))
    env_path = f"{site}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ALLOCATOR half_attention" in proc.stdout
    assert "KINDS ['o_proj', 'q_proj']" in proc.stdout
    listing = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "plugins"], capture_output=True, text=True,
                             timeout=120, env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert "half_attention" in listing.stdout and "attention_fraction: float = 0.5" in listing.stdout


def test_a_broken_plugin_warns_instead_of_crashing(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lowrank_kit]\nbroken = broken_plugin_module\n")
    (site / "broken_plugin_module.py").write_text("raise ImportError('missing dependency xyz')\n")
    proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "plugins"], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0
    assert "broken" in proc.stderr and "missing dependency xyz" in proc.stderr
    assert "svd_llm" in proc.stdout
