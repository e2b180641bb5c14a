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


def test_a_broken_plugin_warns_instead_of_crashing(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lowrank_kit]\nbroken = broken_plugin_module\n")
    (site / "broken_plugin_module.py").write_text("raise ImportError('missing dependency xyz')\n")
    proc = subprocess.run([sys.executable, "-m", "lowrank_kit.cli", "plugins"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0
    assert "broken" in proc.stderr and "missing dependency xyz" in proc.stderr
    assert "svd_llm" in proc.stdout
