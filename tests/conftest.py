"""Tiny random models of each supported family, and a byte tokenizer, for fast unit tests."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from lowrank_kit.testing import (  # noqa: E402 - after the thread settings above
    FAMILIES,
    VOCAB,
    ByteTokenizer,
    byte_level_tokenizer,
    sample_ids,
    tiny_config,
    tiny_model,
    tiny_recipe,
)

__all__ = ["FAMILIES", "VOCAB", "ByteTokenizer", "byte_level_tokenizer", "sample_ids", "tiny_config", "tiny_model",
           "tiny_recipe"]


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The recipe fuzzer's counts, when it ran (tests/test_recipe_input.py)."""
    import sys

    module = sys.modules.get("test_recipe_input")
    stats = getattr(module, "FUZZ_STATS", None)
    if stats and stats["cases"]:
        terminalreporter.write_line(
            f"recipe fuzzer through `lowrank-kit validate`: {stats['cases']} cases, exit 0: {stats['exit 0']}, "
            f"exit 2: {stats['exit 2']}, tracebacks 0, slowest {stats['slowest_s']:.3f} s ({stats['slowest']})")
