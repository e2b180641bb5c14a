"""lm-evaluation-harness tasks on lowrank-kit models (the ``eval`` extra: ``pip install 'lowrank-kit[eval]'``).

Importing this module registers the lm-eval model ``lowrank_kit``, so lm-eval's Python API loads
a compressed folder (or a model alias, folder or hub id) the way lowrank-kit does:

    import lowrank_kit.evaluation.lmeval
    lm_eval.simple_evaluate(model="lowrank_kit", model_args="pretrained=runs/flat-llm-0.2", tasks=[...])

``lowrank-kit eval FOLDER --tasks ...`` and a recipe's ``{metric: lm_eval, tasks: [...]}`` use
the same functions. lm-eval's stock ``lm_eval`` command discovers no outside models; its
``--model hf`` works on a folder only after ``import lowrank_kit``, which that command never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_kit.recipe.spec import EvalSpec
from lowrank_kit.reporting.progress import Progress, quiet

EXTRA = "lm-eval is not installed: pip install 'lowrank-kit[eval]'"


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ImportError(EXTRA) from None
    return lm_eval


def load_any(pretrained: str) -> tuple[Any, Any]:
    """A lowrank-kit folder through ``load_pretrained``; anything else through the model loader."""
    from transformers import AutoTokenizer

    from lowrank_kit.models.loading import load_model
    from lowrank_kit.persistence.saving import load_pretrained, weight_files

    folder = Path(pretrained)
    if weight_files(folder) and (folder / "config.json").is_file() and "lowrank" in (
            folder / "config.json").read_text():
        return load_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return load_model(pretrained)


def language_model(model: Any, tokenizer: Any, batch_size: int = 1, device: Any = None) -> Any:
    """lm-eval's ``HFLM`` around an already loaded model (any causal LM, compressed or not)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    kwargs = {"device": str(device)} if device is not None else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal", **kwargs)


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """Tasks from ``include_path`` alone when they are all there (indexing lm-eval's ~15,000 built-in
    task files takes seconds), else from both."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def run(model: Any, tokenizer: Any, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
        include_path: str | None = None, batch_size: int = 1, device: Any = None) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` (its ``simple_evaluate`` output)."""
    lm_eval = _lm_eval()
    manager = task_manager(tasks, include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {unknown[0]!r}" + (" in --include-path or its built-in tasks"
                                                                   if include_path else ""))
    results = lm_eval.simple_evaluate(model=language_model(model, tokenizer, batch_size, device), tasks=tasks,
                                      num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      log_samples=False, verbosity="ERROR")
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each task's metrics (stderr left out): {"task": {"acc,none": 0.5, ...}}."""
    return {task: {k: float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and "stderr" not in k and k != "alias"}
            for task, metrics in results["results"].items()}


def headline(task_scores: dict[str, float]) -> float:
    """The number a report row shows for one task: accuracy when it has one, else its first metric."""
    for key in ("acc,none", "exact_match,none", "acc_norm,none"):
        if key in task_scores:
            return task_scores[key]
    return next(iter(task_scores.values()))


def row(model: Any, tokenizer: Any, spec: EvalSpec, needs_bos: bool, fabric: Any = None, desc: str = "lm_eval",
        progress: Progress = quiet, dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report row: the mean headline score over the tasks, each task's metrics in the details."""
    results = run(model, tokenizer, spec.tasks, spec.num_fewshot, spec.limit, spec.include_path, spec.batch_size,
                  fabric.device if fabric is not None else None)
    # the tasks asked for: a group task (e.g. mmlu) also lists its subtasks, which must not count twice
    per_task = {task: metrics for task, metrics in scores(results).items() if task in spec.tasks and metrics}
    if not per_task:
        raise ValueError(f"lm-eval gave no numeric score for {spec.tasks}")
    values = [headline(metrics) for metrics in per_task.values()]
    samples = sum(int(n.get("effective", n.get("original", 0))) for n in results.get("n-samples", {}).values())
    return {"metric": "lm_eval", "dataset": ",".join(spec.tasks), "tokens": samples,
            "value": sum(values) / len(values), "tasks": per_task}


def _register() -> None:
    """The lm-eval model ``lowrank_kit`` (done at import when lm-eval is installed)."""
    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return

    @register_model("lowrank_kit")
    class LowRankKitLM(HFLM):  # type: ignore[misc, valid-type]
        """HFLM whose ``pretrained`` string is loaded by lowrank-kit (compressed folders, aliases)."""

        def __init__(self, pretrained: Any, tokenizer: Any = None, **kwargs: Any):
            if isinstance(pretrained, str):
                pretrained, loaded = load_any(pretrained)
                tokenizer = tokenizer or loaded
            kwargs.setdefault("backend", "causal")
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)


_register()
