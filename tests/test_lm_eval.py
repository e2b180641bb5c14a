"""lm-evaluation-harness on compressed folders, offline: a local multiple-choice task the test writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import byte_level_tokenizer, tiny_model, tiny_recipe

from lowrank_kit import compress, load_pretrained
from lowrank_kit.cli import main
from lowrank_kit.data.texts import load_text
from lowrank_kit.evaluation import lmeval

TASK = "austen_next_word"


def write_task(folder: Path, rows: int = 12) -> Path:
    """Which of four words comes next in a Persuasion sentence (the true one is choice 0..3)."""
    words = load_text("austen-persuasion", "evaluation", "text").split()
    data = folder / "questions.jsonl"
    with data.open("w") as out:
        for i in range(rows):
            at = 200 + 37 * i
            choices = [words[at + 10], words[at + 50], words[at + 90], words[at + 130]]
            answer = i % 4
            choices[0], choices[answer] = choices[answer], choices[0]
            out.write(json.dumps({"context": " ".join(words[at:at + 10]), "choices": choices, "label": answer}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("tasks"))


def compressed(tmp_path: Path, **extra: Any) -> Any:
    return compress(tiny_recipe(tmp_path, "svd_llm", 0.3, **extra), model=tiny_model("llama"),
                    tokenizer=byte_level_tokenizer(), progress=False)


def test_cli_eval_equals_simple_evaluate_on_hflm(tmp_path: Path, task_dir: Path, capsys: Any) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    folder = compressed(tmp_path).output_dir
    assert main(["eval", str(folder), "--tasks", TASK, "--include-path", str(task_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Tasks" in printed and "Metric" in printed  # lm-eval's own table, with its headers
    line = next(row for row in printed.splitlines() if TASK in row)
    ours = float([cell for cell in line.split("|") if cell.strip()][-3])  # | task | ... | acc | ↑ | value | ± | err |
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=load_pretrained(folder), tokenizer=AutoTokenizer.from_pretrained(folder)),
        tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    assert direct is not None
    assert ours == pytest.approx(direct["results"][TASK]["acc,none"], abs=1e-4)
    # the registered lm-eval model loads the folder by its path
    registered = lm_eval.simple_evaluate(model="lowrank_kit", model_args=f"pretrained={folder}", tasks=[TASK],
                                         task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    assert registered is not None
    assert registered["results"][TASK]["acc,none"] == direct["results"][TASK]["acc,none"]


def test_a_recipe_evaluation_reports_dense_and_compressed(tmp_path: Path, task_dir: Path) -> None:
    evaluate = [{"metric": "lm_eval", "tasks": [TASK], "include_path": str(task_dir), "batch_size": 4}]
    report = compressed(tmp_path, evaluate=evaluate).report
    row = report["evaluation"][0]
    assert row["metric"] == "lm_eval" and row["dataset"] == TASK and row["tokens"] == 12
    assert 0 <= row["dense"] <= 1 and 0 <= row["compressed"] <= 1
    assert set(row["details"]["compressed"]["tasks"][TASK]) >= {"acc,none"}


def test_an_unknown_task_is_named(tmp_path: Path, task_dir: Path) -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="lm-eval knows no task 'nope'"):
        lmeval.run(model, byte_level_tokenizer(), ["nope"], include_path=str(task_dir))
