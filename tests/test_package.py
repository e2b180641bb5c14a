"""The package as a user meets it: the wheel's contents, --version, help, quiet, shipped recipes by name."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lowrank_kit.cli import build_parser, main, quiet

ROOT = Path(__file__).parent.parent


def test_the_wheel_ships_recipes_data_and_type_information(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next(tmp_path.glob("lowrank_kit-*.whl"))).namelist())
    shipped = {f"lowrank_kit/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped and shipped <= names
    assert "lowrank_kit/py.typed" in names and "lowrank_kit/data/austen_emma.txt" in names
    assert "lowrank_kit_plugins/headwise_pca.py" in names
    assert not any(n.startswith(("tests/", "plugins/", "recipes/")) for n in names)


def test_a_shipped_recipe_is_used_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "flat_llm"]) == 0
    assert "ok: 'flat-llm' is valid" in capsys.readouterr().out
    assert main(["validate", "flat_lm"]) == 2
    assert "did you mean the shipped recipe 'flat_llm'?" in capsys.readouterr().err


def test_version_and_plain_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    out = capsys.readouterr().out
    assert out.startswith("lowrank-kit 0.") and "torch" in out and "transformers" in out
    text = build_parser().format_help()
    assert "``" not in text and "examples:" in text


def test_quiet_silences_the_libraries_bars() -> None:
    import datasets
    import huggingface_hub
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    try:
        quiet()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        assert gguf_utils.tqdm([1, 2]).disable  # the GGUF loader's own bar
    finally:
        gguf_utils.tqdm = bar
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
        huggingface_hub.utils.enable_progress_bars()
        datasets.enable_progress_bars()
        datasets.logging.set_verbosity_warning()


def test_quiet_leaves_datasets_unimported_but_silenced() -> None:
    """Importing datasets (and pyarrow) only to silence it cost about 84 MB of every quiet run."""
    code = ("import os, sys; from lowrank_kit.cli import quiet, restore_environment; before = quiet(); "
            "assert 'datasets' not in sys.modules; "
            "import datasets, logging; assert not datasets.is_progress_bar_enabled(); "
            "assert datasets.logging.get_verbosity() == logging.ERROR; "
            "restore_environment(before); assert 'DATASETS_VERBOSITY' not in os.environ")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "DATASETS_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_report_names_versions_and_device(tmp_path: Path) -> None:
    from conftest import ByteTokenizer, tiny_model, tiny_recipe

    from lowrank_kit import compress

    result = compress(tiny_recipe(tmp_path, "svd", 0.3), model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                      progress=False)
    env = result.report["environment"]
    assert set(env) >= {"lowrank_kit", "torch", "transformers", "lightning", "python", "device"}
    assert env["device"].startswith("cpu: ")
    assert f"transformers {env['transformers']}" in (result.output_dir / "report.md").read_text()
