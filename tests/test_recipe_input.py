"""Hostile or broken recipe input: every document and --set validates or is one located RecipeError, fast.

The cases that hung (an error path with no dot), blew up memory (an alias bomb) or raised a
traceback (bad YAML in --set, non-string targets, deep nesting, non-UTF-8) before, plus a
property-based fuzzer over mutations of the shipped recipes and random --set strings.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_kit.cli import main
from lowrank_kit.extension.manager import registry
from lowrank_kit.recipe.loading import load
from lowrank_kit.recipe.schema import RecipeError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
BOUND_S = 5.0  # generous: a case that hangs or explodes takes minutes or forever
registry()  # discovering the plugins (importing transformers) is a one-off cost, not the recipe's


def outcome(path: Path, overrides: list[str] | None = None) -> RecipeError | None:
    """None when the recipe validates; the RecipeError otherwise. Any other exception fails the test."""
    start = time.perf_counter()
    try:
        load(path, overrides)
        error = None
    except RecipeError as err:
        error = err
    assert time.perf_counter() - start < BOUND_S
    return error


CLI_BOUND_S = 1.0
FUZZ_STATS: dict[str, object] = {"cases": 0, "exit 0": 0, "exit 2": 0, "slowest_s": 0.0, "slowest": ""}


def cli_outcome(path: Path, overrides: list[str] | None = None) -> int:
    """``lowrank-kit validate`` in this process: exit 0 or 2, no traceback, within a second."""
    argv = ["validate", str(path), *(f"--set={o}" for o in overrides or [])]
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code if isinstance(stop.code, int) else 2
    seconds = time.perf_counter() - start
    assert code in (0, 2), (argv, err.getvalue()[-2000:])
    assert "Traceback" not in err.getvalue() + out.getvalue(), argv
    if code == 2:
        assert err.getvalue().startswith("error: ") or err.getvalue().startswith("usage: "), err.getvalue()[:500]
    assert seconds < CLI_BOUND_S, (argv, seconds)
    FUZZ_STATS["cases"] = int(FUZZ_STATS["cases"]) + 1
    FUZZ_STATS[f"exit {code}"] = int(FUZZ_STATS[f"exit {code}"]) + 1
    if seconds > float(FUZZ_STATS["slowest_s"]):
        FUZZ_STATS["slowest_s"], FUZZ_STATS["slowest"] = seconds, " ".join(argv)[:160]
    return code


def write(tmp_path: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def shipped(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(RECIPES[0].read_text())
    edit(data)
    return write(tmp_path, yaml.safe_dump(data))


@pytest.mark.parametrize("key", ["name", "model", "target", "transform"])
def test_a_missing_top_level_key_is_located_not_a_hang(tmp_path: Path, key: str) -> None:
    err = outcome(shipped(tmp_path, lambda d: d.pop(key)))
    assert err is not None and f"missing required key '{key}'" in str(err)


@pytest.mark.parametrize(("override", "message"), [
    ("targt.ratio=0.3", "unknown key 'targt'; did you mean 'target'?"),
    ("target.ratio", "expected key.path=value"),
    ("target.ratio=[1", "not valid YAML"),
    ("target.ratio=.nan", "target.ratio"),
])
def test_bad_overrides_are_one_line(tmp_path: Path, override: str, message: str) -> None:
    err = outcome(RECIPES[0], [override])
    assert err is not None and message in str(err) and "\n" not in str(err)


def test_non_string_keys_and_targets(tmp_path: Path) -> None:
    err = outcome(write(tmp_path, RECIPES[0].read_text() + "1: one\n"))
    assert err is not None and "unknown key '1'" in str(err)
    for bad in (None, 1):
        err = outcome(shipped(tmp_path, lambda d, bad=bad: d["transform"][0].update(targets=[bad])))
        assert err is not None and "expected a projection name" in str(err)


def test_duplicate_keys_are_an_error_with_both_lines(tmp_path: Path) -> None:
    text = RECIPES[0].read_text()
    err = outcome(write(tmp_path, text + "name: again\n"))
    assert err is not None and "key 'name' appears twice" in str(err)
    assert err.line == len(text.splitlines()) + 1


def test_alias_bomb_deep_nesting_size_and_encoding(tmp_path: Path) -> None:
    bomb = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    err = outcome(write(tmp_path, "\n".join(bomb) + "\nname: *a7\n"))
    assert err is not None and "YAML nodes" in str(err)
    err = outcome(write(tmp_path, "name: " + "[" * 50_000 + "]" * 50_000 + "\n"))
    assert err is not None and "nested" in str(err)
    err = outcome(write(tmp_path, "name: x\n" + "# filler\n" * 200_000))
    assert err is not None and "characters" in str(err)
    err = outcome(write(tmp_path, b"name: caf\xe9\n"))
    assert err is not None and "not UTF-8" in str(err)


# The fuzzer: mutations of the shipped recipes (delete, retype, duplicate, nest) and random --set strings.
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(
                       st.text(max_size=5), st.integers(), max_size=2))
KEYS = st.sampled_from(["name", "model", "calibration", "target", "transform", "allocate", "score", "collect",
                        "decode", "evaluate", "runtime", "output", "targt", "ratio", "plugin", "targets",
                        "samples", "seed", "dataset", "path", "dir", "0", "[0]", ".", ""])


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@settings(max_examples=700, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=st.sampled_from(RECIPES), seed=st.integers(0, 2**32), value=VALUES,
       how=st.sampled_from(["replace", "delete", "wrap", "raw"]))
def test_fuzzed_documents_validate_or_fail_cleanly(tmp_path: Path, recipe: Path, seed: int, value, how: str) -> None:
    text = recipe.read_text()
    if how == "raw":  # byte-level damage of the text itself
        rng = random.Random(seed)
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(chars))
            chars[at:at + rng.randint(0, 3)] = rng.choice(["", ":", "[", "]", "{", "&a", "*a", "- ", "\t", "\x00",
                                                            "\n  ", "'"])
        text = "".join(chars)
    else:
        data = yaml.safe_load(text)
        paths = [p for p in _paths(data) if p]
        path = random.Random(seed).choice(paths)
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        if how == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value if how == "replace" else [parent[path[-1]], value]
        text = yaml.safe_dump(data)
    cli_outcome(write(tmp_path, text, f"fuzz-{seed}.yaml"))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(recipe=st.sampled_from(RECIPES), key=st.lists(KEYS, min_size=0, max_size=4),
       sep=st.sampled_from(["=", "", "==", "=["]), value=st.text(max_size=16))
def test_fuzzed_overrides_validate_or_fail_cleanly(recipe: Path, key: list[str], sep: str, value: str) -> None:
    cli_outcome(recipe, [".".join(key) + sep + value])


@pytest.mark.parametrize(("override", "message"), [
    ("transform[1].ridge=.nan", "finite number"),
    ("runtime.devices=0", "devices: must be at least 1"),
    ("calibration.seed=18446744073709551616", "far too large"),
    ("calibration.seed=-1", "seed: must lie in [0, 2**32)"),
    ("calibration.samples=1000000000000000000", "far too large"),
    ("calibration.samples=1000000", "beyond 100,000,000"),
    ("runtime.accelerator=banana", "runtime.accelerator: 'banana' is not allowed"),
    ("runtime.precision=17", "runtime.precision"),
    ("output.dir='runs/{oops}'", "cannot be filled in"),
    ("output.dir=''", "working directory or the filesystem root"),
    ("output.dir=.", "working directory or the filesystem root"),
    ("output.dir=/", "working directory or the filesystem root"),
    ("transform=[]", "needs at least one transform"),
    ("allocate={}", "expected a strategy name"),
    ("allocate=0", "expected a strategy name"),
    ("evaluate=false", "expected a list of evaluations"),
    ("calibration.dataset=" + "x" * 300 + ".txt", "not a usable file name"),
])
def test_values_are_checked_for_meaning(override: str, message: str) -> None:
    path = Path(__file__).parent.parent / "recipes" / "flat_llm.yaml"
    err = outcome(path, [override])
    assert err is not None and message in str(err), str(err)


def test_model_path_typos_and_our_own_outputs_fail_before_any_loading(tmp_path: Path) -> None:
    from lowrank_kit.models.loading import load_model

    with pytest.raises(RecipeError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2-135")
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text('{"model_type": "llama", "lowrank": {"format": 2}}')
    before = sorted((p.name, p.read_bytes()) for p in output.iterdir())
    with pytest.raises(RecipeError, match="is a lowrank-kit output"):
        load_model(str(output))
    assert sorted((p.name, p.read_bytes()) for p in output.iterdir()) == before  # never modified


def test_a_ratio_that_zeroes_every_module_is_refused(tmp_path: Path) -> None:
    from conftest import ByteTokenizer, tiny_model, tiny_recipe

    from lowrank_kit import compress

    with pytest.raises(RecipeError, match=r"target\.ratio: 0\.999 leaves every compressed module at rank 0"):
        compress(tiny_recipe(tmp_path, "svd", 0.999), model=tiny_model("llama"), tokenizer=ByteTokenizer(),
                 progress=False)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds no text"),
    (b"Too short.", "fewer than one window"),
    (bytes(range(256)) * 64, "cannot read"),
])
def test_bad_calibration_data_fails_before_the_dense_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               content: bytes, message: str) -> None:
    from conftest import ByteTokenizer, tiny_model, tiny_recipe

    from lowrank_kit import compress
    from lowrank_kit.pipeline.engine import Engine

    monkeypatch.setattr(Engine, "_dense_evaluations", lambda *_: pytest.fail("evaluated before reading the data"))
    data = tmp_path / f"calibration-{len(content)}.txt"
    data.write_bytes(content)
    recipe = tiny_recipe(tmp_path, calibration={**tiny_recipe(tmp_path)["calibration"], "dataset": str(data)})
    with pytest.raises(RecipeError, match=rf"calibration\.dataset: .*{message}"):
        compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path: Path) -> None:
    import os

    from conftest import ByteTokenizer, tiny_model, tiny_recipe

    from lowrank_kit import compress

    if os.geteuid() == 0:  # root writes anywhere; a file in the way stands in for a read-only folder
        blocker = tmp_path / "blocker"
        blocker.write_text("not a folder")
        target = blocker / "out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    recipe = tiny_recipe(tmp_path, output={"dir": str(target), "cache_dir": None})
    with pytest.raises(RecipeError, match=r"output\.dir: cannot write"):
        compress(recipe, model=tiny_model("llama"), tokenizer=ByteTokenizer(), progress=False)
