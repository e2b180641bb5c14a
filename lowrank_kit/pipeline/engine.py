"""The engine: orchestrates a run; the calibration passes themselves are ``pipeline.passes``.

load → calibration data → dense evaluations (cached) → units → scoring pass (only if the
recipe scores anything; cached) → allocate → the recipe's layer pass → decode → evaluate →
save → report, each an obvious method, each phase timed and announced to the callbacks.
Every finished layer is checkpointed in the run's private partial folder, so a run that
crashed or was killed continues from there with ``resume`` (``persistence.checkpoint``).
Lightning Fabric places the model and data and runs calibration data-parallel when given
several devices; statistics are summed across processes before any decomposition.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pluggy
import torch
from lightning.fabric import Fabric

from lowrank_kit import heap
from lowrank_kit.compressed import quantization
from lowrank_kit.compressed.plan import ErrorCurve
from lowrank_kit.data.texts import (
    calibration_windows,
    heldout_windows,
    is_json,
    load_text,
    tokenize,
    window_counts,
)
from lowrank_kit.evaluation.metrics import DECODE_INDEPENDENT, evaluate
from lowrank_kit.extension.manager import run_manager
from lowrank_kit.harness.speed import quick_compare
from lowrank_kit.models import offload
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.models.loading import load_lazily, load_model
from lowrank_kit.persistence import saving as io
from lowrank_kit.persistence.checkpoint import Checkpoints
from lowrank_kit.pipeline.cache import Cache, DenseStore, fingerprint
from lowrank_kit.pipeline.callbacks import Callback, ProgressBar
from lowrank_kit.pipeline.errors import annotate, describe, interrupted, write_log
from lowrank_kit.pipeline.passes import LAYER_PASSES, ErrorCurvePass, LayerLossPass, PassContext, ScoringPass
from lowrank_kit.pipeline.state import RunState
from lowrank_kit.recipe.schema import RecipeError, to_dict
from lowrank_kit.recipe.spec import DataSpec, Recipe
from lowrank_kit.reporting import report

T = TypeVar("T")


@dataclass
class Result:
    """What a run returns: the compressed model (in memory), its tokenizer, report, folder."""

    model: Any
    tokenizer: Any
    report: dict[str, Any]
    output_dir: Path | None
    run: RunState
    evaluations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dense_params: int = 0

    def summary(self) -> str:
        """One line: recipe, ratio reached, each metric dense → compressed, the folder."""
        rep = self.report
        metrics = ", ".join(f"{row['metric']} {row['dense']:.4g} → {row['compressed']:.4g}" if "dense" in row
                            else f"{row['metric']} {row['compressed']:.4g}" for row in rep.get("evaluation", []))
        where = f", saved to {self.output_dir}" if self.output_dir is not None else ""
        return (f"{rep['name']}: ratio {rep['achieved_ratio']:.4f} of the decoder's linear weights removed "
                f"(target {rep['target_ratio']:g})" + (f"; {metrics}" if metrics else "") + where)

    def __repr__(self) -> str:
        return f"Result({self.summary()})"


class Engine:
    def __init__(self, recipe: Recipe, callbacks: list[Callback] | None = None, overwrite: bool = False,
                 progress: bool = True, store: DenseStore | None = None, resume: bool = False,
                 checkpoint: bool = True):
        """``resume``: continue the unfinished run of this recipe found in its partial folder;
        ``checkpoint``: record every finished layer there (off in a bench, which resumes by cell)."""
        self.recipe = recipe
        self.resume = resume
        self.checkpoint = checkpoint
        self.checkpoints: Checkpoints | None = None
        self.store = store  # dense-model statistics and factorisations shared with other runs (a bench)
        self.callbacks = list(callbacks or []) + ([ProgressBar()] if progress else [])
        self.overwrite = overwrite or recipe.output.overwrite
        self.timings: dict[str, float] = {}
        self.run_state: RunState | None = None
        self.current_phase: str | None = None  # where an error happened, for its message
        self.current_layer: int | None = None

    def _emit(self, event: str, *args: Any) -> None:
        if event in ("on_layer_start", "on_layer_end"):
            self.current_layer = args[0] if event == "on_layer_start" else None
        for callback in self.callbacks:
            getattr(callback, event)(self.run_state, *args)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; its end event is sent even when it fails (before the error reaches ``on_exception``)."""
        self._emit("on_phase_start", name)
        start = time.perf_counter()
        self.current_phase = name
        try:
            yield
            self.current_phase = None
        finally:
            seconds = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self._emit("on_phase_end", name, seconds)

    def _context(self, run: RunState, pm: pluggy.PluginManager) -> PassContext:
        return PassContext(run=run, pm=pm, emit=self._emit, progress=self._progress,
                           checkpoints=self.checkpoints if self.checkpoint else None)

    def _progress(self, items: Iterable[T], total: int, label: str) -> Iterator[T]:
        """The run's ``Progress``: batches of a pass or an evaluation, announced to the callbacks."""
        self._emit("on_batches_start", label, total)
        for item in items:
            yield item
            self._emit("on_batch_end", label)
        self._emit("on_batches_end", label)

    def run(self, model: Any = None, tokenizer: Any = None, reuse: Result | None = None) -> Result:
        """Compress: load → dense evaluations → calibration data → passes → decode → evaluate → save.

        A model passed in (e.g. a tiny one in tests) is used instead of loading one. ``reuse`` is
        the result of a run without a decode strategy whose recipe differs from this one at most
        in ``decode``, ``name`` and ``output``: its compressed model is copied and only decoding,
        evaluation and saving run (the report keeps that run's compression times). Any error
        reaches the callbacks' ``on_exception`` before it propagates.
        """
        try:
            if reuse is not None:
                return self._reuse(reuse)
            run, pm = self._load(model, tokenizer)
            assert self.checkpoints is not None
            self.checkpoints.check_model(self._dense_fingerprint(run))
            dense_params = io.count_params(run.model)
            evaluations: dict[str, list[dict[str, Any]]] = {"dense": [], "compressed": []}
            with self.phase("calibration data"):  # before the dense evaluations: bad data must not wait for them
                self._calibration_data(run)
            with self.phase("evaluate dense"):
                evaluations["dense"] = self._dense_evaluations(run)
            target = self.recipe.target  # one rounding and one break-even for every allocator (Unit)
            run.units = [dataclasses.replace(u, multiple=target.multiple, break_even=target.break_even)
                         for units in pm.hook.lowrank_units(run=run) for u in units]
            if self.recipe.score or self._transforms_need_dense_statistics(pm):
                with self.phase("score"):
                    self._scores(run, pm)
            if any(getattr(strategy, "needs_error_curves", False) is True for strategy in pm.get_plugins()):
                with self.phase("error curves"):
                    self._error_curves(run, pm)
            with self.phase("allocate"):
                self._allocate(run, pm)
            allocator = next((s for s in pm.get_plugins() if getattr(s, "point", None) == "allocate"), None)
            if getattr(allocator, "refine_rounds", 0):
                with self.phase("refine plan"):
                    self._refine(run, pm, allocator)
            with self.phase("compress"):
                self._compress(run, pm)
            if self.recipe.quantize.weights != "none":
                with self.phase("quantize"):
                    self._quantize(run, evaluations["dense"])
            return self._finish(run, pm, evaluations, dense_params)
        except BaseException as err:
            self._emit("on_exception", err)
            self._after_failure(err)
            raise

    def _after_failure(self, err: BaseException) -> None:
        """Describe the failure (one line, the traceback in a log) and say what it left behind."""
        if self.run_state is not None and self.run_state.offload is not None:
            self.run_state.offload.remove_folder()  # a resumed run reads its finished layers from the checkpoints
        if self.checkpoints is not None:
            self.checkpoints.release()
            err.lowrank_hint = self.checkpoints.hint()  # type: ignore[attr-defined]
        if hasattr(err, "lowrank_summary"):
            return
        if isinstance(err, KeyboardInterrupt):
            annotate(err, interrupted(self.current_phase, self.current_layer), None)
        elif not isinstance(err, (RecipeError, SystemExit)):
            annotate(err, describe(err, self.current_phase, self.current_layer),
                     write_log(err, self.recipe.output_dir().parent, self.recipe.name))

    def _load(self, model: Any, tokenizer: Any) -> tuple[RunState, pluggy.PluginManager]:
        """Check the output folder, build the strategies, launch Fabric, load the model."""
        recipe = self.recipe
        io.check_output_dir(recipe.output_dir(), self.overwrite)
        pm = run_manager([choice.build() for choice in recipe.strategies()])
        fabric = Fabric(accelerator=recipe.runtime.accelerator, devices=recipe.runtime.devices,
                        num_nodes=recipe.runtime.num_nodes, precision=recipe.runtime.precision)
        fabric.launch()
        self.checkpoints = Checkpoints.open(recipe.output_dir(), recipe, self.resume, fabric.global_rank == 0)
        mode = recipe.runtime.offload
        _check_offload(recipe)
        if mode != "none":
            heap.return_freed_memory()
        with self.phase("load"):
            source = None
            if model is None and mode == "disk":
                model, tokenizer, source = load_lazily(recipe.model.path, recipe.model.gguf_file, recipe.model.dtype)
            elif model is None:
                model, tokenizer = load_model(recipe.model.path, recipe.model.gguf_file, recipe.model.dtype)
            adapter = adapter_for(model)
            if mode == "none":
                model.to(fabric.device)
            else:
                offload.place_outer(model, adapter.layers, fabric.device)
            model.eval()
        # Beside the output, never in it: the partial folder becomes the output, and every process has its own.
        folder = recipe.output_dir().with_name(f".{recipe.output_dir().name}.offload-{fabric.global_rank}")
        shutil.rmtree(folder, ignore_errors=True)  # what a killed run left
        if mode == "disk" and source is None:  # a model passed in: its dense layers become the files read back
            source = offload.write_dense(model, adapter.layers, folder / "dense")
        run = RunState(recipe=recipe, model=model, tokenizer=tokenizer, adapter=adapter, fabric=fabric,
                       calibration=torch.empty(0),
                       offload=offload.Offloader(model, adapter.layers, fabric.device, mode, folder, source))
        self.run_state = run
        self._emit("on_run_start")
        return run, pm

    def _reuse(self, earlier: Result) -> Result:
        """Decode, evaluate and save a copy of an earlier run's compressed model (see ``run``)."""
        recipe, before = self.recipe, earlier.run.recipe
        if before.runtime.offload != "none":
            raise ValueError(f"cannot reuse run '{before.name}': its layers were offloaded (runtime.offload: "
                             f"{before.runtime.offload}), so its model is not all in memory to copy")
        if before.decode is not None or not same_compression(recipe, before):
            raise ValueError(f"cannot reuse run '{before.name}': only a run without decode whose recipe differs "
                             "at most in decode, name and output can be reused")
        io.check_output_dir(recipe.output_dir(), self.overwrite)
        pm = run_manager([choice.build() for choice in recipe.strategies()])
        self.checkpoints = Checkpoints.open(recipe.output_dir(), recipe, False, earlier.run.fabric.global_rank == 0)
        model = copy.deepcopy(earlier.model)
        run = RunState(recipe=recipe, model=model, tokenizer=earlier.tokenizer, adapter=adapter_for(model),
                       fabric=earlier.run.fabric, calibration=earlier.run.calibration, scores=earlier.run.scores,
                       units=earlier.run.units, plan=earlier.run.plan,
                       notes={**earlier.run.notes, "compression_reused_from": before.name})
        self.run_state = run
        self._emit("on_run_start")
        skip = ("evaluate compressed", "save")
        self.timings = {k: v for k, v in earlier.report["timings_s"].items() if k not in skip}
        evaluations = {"dense": earlier.evaluations["dense"], "compressed": []}
        # Whole-sequence forwards run at the allocated ranks whatever the decode strategy does.
        known = [row if row["metric"] in DECODE_INDEPENDENT else None for row in earlier.evaluations["compressed"]]
        return self._finish(run, pm, evaluations, earlier.dense_params, known)

    def _calibration_data(self, run: RunState) -> None:
        """This process's shard of the seeded calibration windows; every dataset of the recipe is read here.

        A list of sources gives each its share of the windows (``window_counts``), drawn from its own
        text with the recipe's seed plus its position in the list, in list order.
        """
        calibration, fabric = run.recipe.calibration, run.fabric
        # Whole batches go to the processes in turn, so every process's batches are batches one
        # process would form: Fisher sums each batch's squared gradient, which is not additive
        # over windows (a shard of windows would batch them differently).
        batches = calibration_batches(calibration, run.tokenizer, run.adapter.needs_bos)
        if len(batches) < fabric.world_size:
            raise RecipeError("runtime.devices", f"{fabric.world_size} processes need at least as many calibration "
                              f"batches, got {len(batches)}: lower calibration.batch_size or add samples")
        run.calibration = torch.cat(batches[fabric.global_rank :: fabric.world_size])
        for i, spec in enumerate(run.recipe.evaluate):
            if spec.metric != "lm_eval" and not is_json(spec.dataset):  # JSONL: read by its metric, with its fields
                _read_text(spec.dataset, "evaluation", spec.text_field, f"evaluate[{i}].dataset")

    def _allocate(self, run: RunState, pm: pluggy.PluginManager) -> None:
        run.plan = pm.hook.lowrank_allocate(run=run, units=run.units)
        if run.plan is None:
            raise RuntimeError(f"allocator '{run.recipe.allocate.plugin}' returned no plan")
        zero = [u.name for u in run.units if run.plan.rank(u) == 0]
        if zero and len(zero) == len(run.units):
            raise RecipeError("target.ratio", f"{run.recipe.target.ratio:g} leaves every compressed module at rank "
                                              "0 (a model that outputs nothing); lower the ratio")
        if zero:
            warnings.warn(f"target ratio {run.recipe.target.ratio:g} leaves {len(zero)} of {len(run.units)} units at "
                          f"rank 0 (their modules output zeros), e.g. {', '.join(zero[:3])}", stacklevel=2)

    def _refine(self, run: RunState, pm: pluggy.PluginManager, allocator: Any) -> None:
        """Measure every layer's loss at the plan, plan again; ``refine_rounds`` times."""
        self._bind_store(run)
        windows = self._heldout(run, allocator.refine_windows)
        rounds = []
        for _ in range(allocator.refine_rounds):
            run.layer_losses = LayerLossPass(self._context(run, pm), windows).run()
            rounds.append({"measured_loss_by_layer": [round(run.layer_losses[i], 6) for i in sorted(run.layer_losses)],
                           "predicted_loss": run.require_plan().notes.get("predicted_loss")})
            self._allocate(run, pm)
        run.notes["refine"] = {"windows": allocator.refine_windows, "rounds": rounds}

    def _heldout(self, run: RunState, count: int) -> torch.Tensor:
        """This process's share of ``count`` windows of the first calibration text that overlap none
        of its calibration windows (a refining allocator measures on data the transforms did not fit)."""
        calibration = run.recipe.calibration
        sources = calibration.sources()
        first = window_counts([s.weight for s in sources], calibration.samples)[0]
        ids = tokenize(run.tokenizer, _read_text(sources[0].dataset, "calibration", calibration.text_field))
        try:
            windows = heldout_windows(ids, run.tokenizer, count, calibration.seq_len, first, calibration.seed,
                                      run.adapter.needs_bos)
        except ValueError as err:
            raise RecipeError("allocate.refine_windows",
                              f"{err}; ask for fewer or calibrate on a longer text") from None
        return windows[run.fabric.global_rank :: run.fabric.world_size]

    def _compress(self, run: RunState, pm: pluggy.PluginManager) -> None:
        """The recipe's layer pass (``calibration.pipeline``) over every decoder layer."""
        self._bind_store(run)
        layer_pass = LAYER_PASSES[run.recipe.calibration.pipeline]
        run.dense_statistics = layer_pass.dense_statistics
        ctx = self._context(run, pm)
        if ctx.checkpoints is not None and ctx.checkpoints.resumed:
            for key, value in ctx.checkpoints.notes().items():  # the finished layers' notes, for the report
                run.notes.setdefault(key, value)
            run.notes["resumed"] = {"from_layer": ctx.checkpoints.done}
        layer_pass(ctx).run()
        if ctx.checkpoints is not None and ctx.checkpoints.writer:
            run.notes["checkpoint_s"] = round(ctx.checkpoints.seconds, 2)  # part of the compress time

    def _quantize(self, run: RunState, dense_rows: list[dict[str, Any]]) -> None:
        """Quantise the compressed weights; with ``compare``, perplexity and speed before and after."""
        spec = run.recipe.quantize
        before = copy.deepcopy(run.model) if spec.compare else None
        facts = quantization.quantize(run.model, run.adapter.layers, spec.weights)
        if before is not None:
            window = run.calibration[:1].to(run.fabric.device)
            facts["speed"] = quick_compare({"before": before, "after": run.model}, window)
            first = next((i for i, e in enumerate(run.recipe.evaluate) if e.metric == "perplexity"), None)
            if first is not None:
                spec_ppl, dense = run.recipe.evaluate[first], dense_rows[first]
                facts["perplexity"] = {
                    "dataset": spec_ppl.dataset,
                    "before": evaluate(before, run.tokenizer, spec_ppl, run.adapter.needs_bos, run.fabric,
                                       desc="before quantising", progress=self._progress, dense=dense)["value"]}
            del before
        run.notes["quantization"] = facts

    def _finish(self, run: RunState, pm: pluggy.PluginManager, evaluations: dict[str, list[dict[str, Any]]],
                dense_params: int, known: list[dict[str, Any] | None] | None = None) -> Result:
        """Decode, evaluate the compressed model (except rows ``known`` already), save, report."""
        recipe, model, fabric = run.recipe, run.model, run.fabric
        out_dir = recipe.output_dir()
        pm.hook.lowrank_decode(run=run, model=model)
        known = known or [None] * len(recipe.evaluate)
        with self.phase("evaluate compressed"):
            evaluations["compressed"] = [
                row or self._evaluate_one(run, spec, "compressed", dense)
                for spec, dense, row in zip(recipe.evaluate, evaluations["dense"], known, strict=True)]
        checkpoints = self.checkpoints
        assert checkpoints is not None
        if fabric.global_rank == 0:
            with self.phase("save"):
                io.write_model(run, checkpoints.folder)
        if run.offload is not None and run.offload.mode != "none":
            run.notes["offload"] = {"mode": run.offload.mode, "layer_reads": run.offload.loads}
        rep = report.build(run, dense_params, io.count_params(model), evaluations, self.timings)
        weights = io.weight_files(checkpoints.folder)
        if fabric.global_rank == 0 and weights:
            rep["model_file_bytes"] = sum(f.stat().st_size for f in weights)
        files = {"generations.jsonl": report.generations_jsonl(evaluations)}
        saved = None
        if fabric.global_rank == 0:
            saved = io.finish(run, checkpoints.folder, out_dir, rep, self.overwrite, files,
                              before_move=checkpoints.finish)
        if run.offload is not None and run.offload.mode == "disk" and saved is not None:
            run.offload.reopen(saved)  # the returned model reads its layers from the saved shards
        elif run.offload is not None:
            run.offload.remove_folder()
        self._emit("on_run_end", rep)
        return Result(model=model, tokenizer=run.tokenizer, report=rep, output_dir=saved, run=run,
                      evaluations=evaluations, dense_params=dense_params)

    def _dense_fingerprint(self, run: RunState) -> str:
        """The dense model's identity for cache keys, taken before any layer is compressed."""
        if "fingerprint" not in run.notes:
            run.notes["fingerprint"] = fingerprint(run.model, run.offload.state_items() if run.offload else None)
        return run.notes["fingerprint"]

    def _dense_evaluations(self, run: RunState) -> list[dict[str, Any]]:
        """The dense model's evaluations, from the cache when this model and data were evaluated before."""
        cache = Cache(run.recipe.output.cache_dir)
        model_key = self._dense_fingerprint(run)
        rows = []
        for spec in run.recipe.evaluate:
            key = {"model": model_key, "evaluation": to_dict(spec), "needs_bos": run.adapter.needs_bos,
                   "world_size": run.fabric.world_size}
            row = cache.get("dense-eval", key)
            if row is None:
                row = self._evaluate_one(run, spec, "dense")
                cache.put("dense-eval", key, row)
            rows.append(row)
        return rows

    def _evaluate_one(self, run: RunState, spec: Any, label: str, dense: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        """One recipe evaluation; a compressed model's is compared with the dense model's row."""
        return evaluate(run.model, run.tokenizer, spec, run.adapter.needs_bos, run.fabric,
                        desc=f"{label} {spec.metric}", progress=self._progress, dense=dense)

    @staticmethod
    def _transforms_need_dense_statistics(pm: pluggy.PluginManager) -> bool:
        """Whether a transform reads statistics of the scoring pass (``lowrank_collect_dense``), which
        then runs even when the scores come from the cache (statistics are not cached on disk; a
        bench's store may hold them, and then the pass gathers nothing)."""
        return any(getattr(s, "point", None) == "transform" and getattr(s, "needs_dense_statistics", False) is True
                   for s in pm.get_plugins())

    def _scores(self, run: RunState, pm: pluggy.PluginManager) -> None:
        """Importances from the cache when the same model, data and scorers were seen before."""
        recipe = run.recipe
        cache = Cache(recipe.output.cache_dir)
        key = {
            **self._data_key(run),
            "collect": [c.to_dict() for c in recipe.collect],
            "score": [c.to_dict() for c in recipe.score],
        }
        cached = cache.get("scores", key)
        self._bind_store(run)
        keeps = self.checkpoints if self.checkpoint else None  # a bench resumes by cell instead
        if cached is None and keeps is not None:
            cached = keeps.scores()
        if cached is not None:
            if self._transforms_need_dense_statistics(pm):
                # The pass runs for the transforms' statistics only: the scores stay the cached
                # ones (a resumed run's restored layers were cut at the plan made from them).
                ScoringPass(transforms_only=True).run(self._context(run, pm))
            run.scores.update(cached)
            run.notes["scores"] = {"cached": True}
            return
        ScoringPass().run(self._context(run, pm))
        cache.put("scores", key, run.scores)
        if keeps is not None:
            keeps.save_scores(run.scores)
        run.notes["scores"] = {"cached": False}

    def _error_curves(self, run: RunState, pm: pluggy.PluginManager) -> None:
        """Every unit's truncation-error curve, from the cache when this model, data and these
        transforms were measured before (the pass costs a dense forward and every decomposition)."""
        cache = Cache(run.recipe.output.cache_dir)
        key = {**self._data_key(run), "transform": [c.to_dict() for c in run.recipe.transform], "curves": 2}
        cached = cache.get("error-curves", key)
        if cached is not None:
            run.error_curves = {name: ErrorCurve(name, entry["site"], tuple(entry["error"]),
                                                 tuple(entry.get("weight_error", ())))
                                for name, entry in cached.items()}
            run.notes["error_curves"] = {"cached": True}
            return
        self._bind_store(run)
        ErrorCurvePass(self._context(run, pm)).run()
        missing = [u.name for u in run.units if u.name not in run.error_curves]
        if missing:
            transforms = sorted({u.transform for u in run.units if u.name in missing})
            raise RuntimeError(f"allocator '{run.recipe.allocate.plugin}' plans from truncation-error curves, but "
                               f"transform {', '.join(transforms)} reported none (lowrank_error_curves) for "
                               f"{len(missing)} units, e.g. {missing[0]}")
        cache.put("error-curves", key, {name: c.to_dict() for name, c in run.error_curves.items()})
        run.notes["error_curves"] = {"cached": False}

    def _bind_store(self, run: RunState) -> None:
        """Point the run at the bench's store, under this dense model and data (None outside a bench)."""
        run.store, run.store_base = self.store, json.dumps(self._data_key(run), sort_keys=True, default=str)

    def _data_key(self, run: RunState) -> dict[str, Any]:
        """What makes two runs' calibration forwards of the dense model identical."""
        return {"model": self._dense_fingerprint(run), "calibration": run.recipe.calibration_data(),
                "world_size": run.fabric.world_size, "precision": run.recipe.runtime.precision}

def _read_text(name: str, purpose: str, text_field: str, key: str = "calibration.dataset") -> str:
    """A dataset's text, or a located error when it cannot be read or holds none."""
    try:
        text = load_text(name, purpose, text_field)
    except RecipeError:
        raise
    except Exception as err:  # datasets raises many kinds for unreadable files
        raise RecipeError(key, f"cannot read '{name}' as text ({type(err).__name__}: {err})") from None
    if not text.strip():
        raise RecipeError(key, f"'{name}' holds no text")
    return text


def _check_offload(recipe: Recipe) -> None:
    """What layer-wise onloading does not do yet, refused before any work."""
    mode = recipe.runtime.offload
    if mode == "none":
        return
    if getattr(recipe.allocate.args, "refine", 0):
        raise RecipeError("allocate.refine", f"a refined plan is not measured under runtime.offload: {mode} yet; "
                                             "drop refine or set runtime.offload: none")
    if recipe.quantize.weights != "none":
        raise RecipeError("quantize.weights", f"int8 quantisation is not done under runtime.offload: {mode} yet; "
                                              "quantise the saved model, or use runtime.offload: none")
    if mode == "disk" and not recipe.output.save_model:
        raise RecipeError("output.save_model", "runtime.offload: disk keeps the compressed layers in the saved "
                                               "model's files; set output.save_model: true")


def same_compression(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes compress identically (they may differ in decode, name and output)."""
    first, second = a.to_dict(), b.to_dict()
    return all(first[k] == second[k] for k in first if k not in ("name", "decode", "output"))


def calibration_batches(calibration: DataSpec, tokenizer: Any, needs_bos: bool) -> list[torch.Tensor]:
    """The recipe's seeded calibration windows, in batches of ``calibration.batch_size``.

    A list of sources gives each its share of the windows (``window_counts``), drawn from its own
    text with the recipe's seed plus its position in the list, in list order.
    """
    sources = calibration.sources()
    counts = window_counts([s.weight for s in sources], calibration.samples)
    parts = []
    for i, (source, count) in enumerate(zip(sources, counts, strict=True)):
        key = "calibration.dataset" if isinstance(calibration.dataset, str) else f"calibration.dataset[{i}]"
        ids = tokenize(tokenizer, _read_text(source.dataset, "calibration", calibration.text_field, key))
        try:
            parts.append(calibration_windows(ids, tokenizer, count, calibration.seq_len, calibration.seed + i,
                                             needs_bos))
        except ValueError as err:
            raise RecipeError(key, f"'{source.dataset}': {err}") from None
    return list(torch.cat(parts).split(calibration.batch_size))
