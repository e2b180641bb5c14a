"""The ``lowrank-kit`` command: compress, bench, validate, plugins, eval; the same functions as the Python API."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from lowrank_kit.extension.manager import registry
from lowrank_kit.extension.strategy import HOOK_POINTS
from lowrank_kit.pipeline.errors import summary
from lowrank_kit.recipe.schema import RecipeError, describe_fields


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe file, or a shipped recipe's name (e.g. flat_llm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a recipe field, e.g. --set target.ratio=0.3 (repeatable)")


def cmd_compress(args: argparse.Namespace) -> int:
    from lowrank_kit.api import compress
    from lowrank_kit.reporting.report import markdown

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output.dir={args.output}")
    result = compress(args.recipe, overrides, overwrite=args.overwrite, progress=not args.quiet, resume=args.resume)
    text = markdown(result.report)
    print(text.split("## Kept rank per module")[0].rstrip())
    if result.output_dir is not None:
        print(f"\nsaved to {result.output_dir} (report.md has the rank of every module)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lowrank_kit.recipe.loading import load

    recipe = load(args.recipe, args.overrides)
    print(f"ok: '{recipe.name}' is valid; resolved recipe:\n")
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = registry()
    for point in HOOK_POINTS:
        print(f"{point}:")
        for name in reg.names(point):
            cls = reg.get(point, name)
            print(f"  {name:<20} {cls.description}")
            if cls.allowed_targets:
                print(f"      targets: {', '.join(cls.allowed_targets)}")
            for field, kind, default, text in describe_fields(cls.Args):
                print(f"      {field}: {kind} = {default}" + (f"  ({text})" if text else ""))
            print(f"      from: {reg.sources[(point, name)]}")
    return 0


def _lm_eval(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    from lowrank_kit.evaluation import lmeval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.include_path and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path: no folder at '{args.include_path}'")
    results = lmeval.run(model, tokenizer, tasks, args.num_fewshot, args.limit, args.include_path, args.batch_size)
    print(lmeval.table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowrank_kit.evaluation.lmeval import EXTRA, load_any
    from lowrank_kit.evaluation.metrics import evaluate
    from lowrank_kit.models.adapters import adapter_for
    from lowrank_kit.recipe.spec import EvalSpec
    from lowrank_kit.reporting.progress import console

    if args.tasks and importlib.util.find_spec("lm_eval") is None:
        raise RecipeError("--tasks", EXTRA)
    if args.offload_disk and args.tasks:
        raise RecipeError("--offload-disk", "lm-eval tasks load the model whole; drop --offload-disk or --tasks")
    if args.offload_disk:
        model, tokenizer = _lazy(args.model)
    else:
        model, tokenizer = load_any(args.model)
    if args.tasks:
        return _lm_eval(args, model, tokenizer)
    spec = EvalSpec(dataset=args.dataset, seq_len=args.seq_len, max_tokens=args.max_tokens)
    row = evaluate(model, tokenizer, spec, adapter_for(model).needs_bos, progress=console)
    print(f"{row['metric']} on {row['dataset']} ({row['tokens']} tokens, windows of {row['seq_len']}): "
          f"{row['value']:.3f}")
    return 0


def _lazy(where: str) -> tuple[Any, Any]:
    """A model read one decoder layer at a time from its safetensors files while it runs."""
    import torch
    from transformers import AutoTokenizer

    from lowrank_kit.models.adapters import adapter_for
    from lowrank_kit.models.loading import build_lazily, load_lazily
    from lowrank_kit.models.offload import Offloader
    from lowrank_kit.persistence.saving import weight_files

    if weight_files(Path(where)):  # a folder saved by lowrank-kit
        model, files = build_lazily(Path(where))
        tokenizer = AutoTokenizer.from_pretrained(where)
    else:
        model, tokenizer, files = load_lazily(where)
    model.lowrank_offload = Offloader(model, adapter_for(model).layers, torch.device("cpu"), "disk", None, files)
    return model, tokenizer


def _ratios(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.2,0.3,0.5, got '{text}'") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from lowrank_kit.harness.bench import run_bench

    rows = run_bench(args.recipes, args.ratios, args.output, args.overrides, args.save_models,
                     progress=not args.quiet)
    print(Path(args.output, "bench.md").read_text())
    failed = [r for r in rows if r.get("error")]
    print(f"table, plots and per-cell reports in {args.output}" + (f"; {len(failed)} cell(s) failed" if failed else ""))
    return 1 if failed else 0


def cmd_speed(args: argparse.Namespace) -> int:
    from lowrank_kit.harness.speed import run_speed, select

    try:
        regimes = select(args.regimes)
    except ValueError as error:
        print(f"error: --regimes: {error}", file=sys.stderr)
        return 2
    run_speed([Path(f) for f in args.folders], Path(args.output), args.repeats, regimes, args.device, args.dtype,
              not args.no_memory, say=(lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr)))
    print(Path(args.output, "speed.md").read_text())
    print(f"table, speed.json and speed.png in {args.output}")
    return 0


DESCRIPTION = """Training-free low-rank compression of LLMs from plugin strategies combined by YAML recipes.

examples:
  lowrank-kit compress flat_llm                      compress with a shipped recipe
  lowrank-kit compress my.yaml --set target.ratio=0.3
  lowrank-kit validate my.yaml                       check a recipe without loading a model
  lowrank-kit plugins                                every strategy and its arguments
  lowrank-kit eval runs/flat-llm-0.2                 perplexity of a saved model
  lowrank-kit speed runs/flat-llm-0.2                dense vs compressed speed on this machine
"""


def versions() -> str:
    from lowrank_kit.reporting.report import library_versions

    v = library_versions()
    return (f"lowrank-kit {v['lowrank_kit']} (torch {v['torch']}, transformers {v['transformers']}, "
            f"lightning {v['lightning']})")


class _Version(argparse.Action):
    """``--version``, computed only when asked (it imports torch and transformers)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(versions())
        parser.exit()


# What ``datasets`` reads at import to stay quiet (the values of ``disable_progress_bars`` and
# ``logging.set_verbosity_error``).
DATASETS_QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "DATASETS_VERBOSITY": "error"}


def quiet() -> dict[str, str | None]:
    """No progress bars or info lines from the libraries either (transformers, the hub, datasets).

    ``datasets`` is told through its environment variables unless already imported: importing it
    (and pyarrow) only to silence it would add about 84 MB to a run that reads bundled texts. A
    user's own values win. Returns what the variables were, for ``restore_environment``."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    before = {name: os.environ.get(name) for name in DATASETS_QUIET}
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    else:
        for name, value in DATASETS_QUIET.items():
            os.environ.setdefault(name, value)
    from lowrank_kit.models import hf_compat

    hf_compat.silence_gguf_progress()
    return before


def restore_environment(before: dict[str, str | None]) -> None:
    """Put back variables ``quiet`` set, so a later import in the same process (``main`` called
    from Python) can show its bars again."""
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-kit", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failed run")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compress", help="compress a model as a recipe says")
    _recipe_args(p)
    p.add_argument("--output", help="output folder (same as --set output.dir=...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder of ours")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue this recipe's run that crashed or was killed, from its last finished layer")
    p.set_defaults(func=cmd_compress)
    p = sub.add_parser("validate", help="check a recipe without loading any model")
    _recipe_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("plugins", help="list every strategy with its hook point and arguments")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("bench", help="every recipe at every ratio on one model and data: table and plots")
    p.add_argument("recipes", nargs="+", help="recipes to compare (they must share model, calibration, evaluate)")
    p.add_argument("--ratios", type=_ratios, default=[0.2, 0.3, 0.5], help="comma-separated, default 0.2,0.3,0.5")
    p.add_argument("--output", default="runs/bench", help="bench folder (an existing bench folder is resumed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a field in every recipe (repeatable)")
    p.add_argument("--save-models", action="store_true", help="also save every compressed model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("eval", help="perplexity, or lm-eval tasks, of a saved compressed model or any model")
    p.add_argument("model", help="a folder written by compress, a model alias, folder or hub id")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (the eval extra); "
                                   "without it: perplexity")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    p.add_argument("--offload-disk", action="store_true",
                   help="perplexity with one decoder layer in memory at a time, read from the safetensors files "
                        "(a model bigger than memory; a GGUF alias is converted once)")
    p.add_argument("--dataset", default="austen-persuasion")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("speed", help="dense vs compressed prefill/decode speed and memory, with the shapes' limits")
    p.add_argument("folders", nargs="+", help="folders written by compress (each against its own dense model)")
    p.add_argument("--output", default="runs/speed", help="where speed.md, speed.json and speed.png go")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per regime and model, after a warm-up")
    p.add_argument("--regimes", nargs="+", metavar="REGIME",
                   help="measure only these: prefill, decode, or one of prefill-1x512, prefill-8x512, "
                        "prefill-1x2048, prefill-8x2048, decode-1, decode-8, decode-32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast both models (default: as saved)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_speed)
    return parser


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    # SIGTERM (a scheduler's pre-emption, `kill`) ends a run like Ctrl-C: one line saying what is kept.
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(args: argparse.Namespace) -> int:
    before = quiet() if getattr(args, "quiet", False) else {}
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        line, _ = summary(err)
        print(f"{line if hasattr(err, 'lowrank_summary') else 'interrupted'}: "
              f"{getattr(err, 'lowrank_hint', None) or 'nothing was written to the output folder'}", file=sys.stderr)
        return 130
    except Exception as err:  # a failed run: one line, the traceback in a file (or with --debug)
        if args.debug:
            raise
        line, log = summary(err)
        print(f"error: {line}", file=sys.stderr)
        print(f"the full traceback is in {log}" if log else "rerun with --debug for the traceback", file=sys.stderr)
        hint = getattr(err, "lowrank_hint", None)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    finally:
        restore_environment(before)


def entry(argv: Any = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if "speed" in args[:1] and "OMP_WAIT_POLICY" not in os.environ and Path(sys.argv[0]).is_file():
        # OpenMP reads its wait policy when torch loads, before any command runs: start again with
        # it set, so idle threads sleep instead of spinning on cores the two models share.
        os.execve(sys.executable, [sys.executable, sys.argv[0], *args], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    sys.exit(main(argv))


if __name__ == "__main__":
    entry()
