"""The engine: drives the hook points of a recipe over a model.

Pass 1 (dense model, only if the recipe scores anything): collect → score. Then allocate.
Pass 2, layer by layer: collect the layer's statistics with inputs from the already
compressed earlier layers (or, with ``calibration.sequential: false``, from the dense model,
which a bench then shares across runs), transform it, recompute its outputs for the next
layer. Then decode, evaluate, save, report. Lightning Fabric places the model and data and runs
calibration data-parallel when given several devices; statistics are summed across
processes before any decomposition.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from tqdm.auto import tqdm

from lowrank_kit.calibration.stats import Tap
from lowrank_kit.data.texts import calibration_windows, load_text, tokenize
from lowrank_kit.evaluation.metrics import DECODE_INDEPENDENT, evaluate
from lowrank_kit.extension.manager import run_manager
from lowrank_kit.models.adapters import adapter_for
from lowrank_kit.models.loading import load_model
from lowrank_kit.persistence import saving as io
from lowrank_kit.pipeline.cache import Cache, DenseStore, fingerprint, statistic_identity
from lowrank_kit.pipeline.callbacks import Callback, ProgressBar
from lowrank_kit.pipeline.replay import LayerInputs, capture, run_layer
from lowrank_kit.pipeline.state import RunState
from lowrank_kit.recipe.schema import to_dict
from lowrank_kit.recipe.spec import Recipe
from lowrank_kit.reporting import report


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


class Engine:
    def __init__(self, recipe: Recipe, callbacks: list[Callback] | None = None, overwrite: bool = False,
                 progress: bool = True, store: DenseStore | None = None):
        self.recipe = recipe
        self.store = store  # dense-model statistics and factorisations shared with other runs (a bench)
        self.callbacks = list(callbacks or []) + ([ProgressBar()] if progress else [])
        self.overwrite = overwrite or recipe.output.overwrite
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.run_state: RunState | None = None

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self.run_state, *args)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._emit("on_phase_start", name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self._emit("on_phase_end", name, seconds)

    def run(self, model: Any = None, tokenizer: Any = None, reuse: Result | None = None) -> Result:
        """Compress. A model passed in (e.g. a tiny one in tests) is used instead of loading one.

        ``reuse`` is the result of a run without a decode strategy whose recipe differs from this
        one at most in ``decode``, ``name`` and ``output``: its compressed model is copied and
        only decoding, evaluation and saving run (the report keeps that run's compression times).
        """
        recipe = self.recipe
        if reuse is not None:
            return self._reuse(reuse)
        out_dir = recipe.output_dir()
        io.check_output_dir(out_dir, self.overwrite)
        strategies = [choice.build() for choice in recipe.strategies()]
        pm = run_manager(strategies)
        fabric = Fabric(accelerator=recipe.runtime.accelerator, devices=recipe.runtime.devices,
                        precision=recipe.runtime.precision)
        fabric.launch()
        with self.phase("load"):
            if model is None:
                model, tokenizer = load_model(recipe.model.path, recipe.model.gguf_file, recipe.model.dtype)
            model.to(fabric.device).eval()
        run = RunState(recipe=recipe, model=model, tokenizer=tokenizer, adapter=adapter_for(model),
                       fabric=fabric, calibration=torch.empty(0))
        self.run_state = run
        self._emit("on_run_start")
        dense_params = io.count_params(model)
        evaluations = self._compress(run, pm)
        return self._finish(run, pm, evaluations, dense_params)

    def _reuse(self, earlier: Result) -> Result:
        """Decode, evaluate and save a copy of an earlier run's compressed model (see ``run``)."""
        recipe, before = self.recipe, earlier.run.recipe
        if before.decode is not None or not same_compression(recipe, before):
            raise ValueError(f"cannot reuse run '{before.name}': only a run without decode whose recipe differs "
                             "at most in decode, name and output can be reused")
        io.check_output_dir(recipe.output_dir(), self.overwrite)
        pm = run_manager([choice.build() for choice in recipe.strategies()])
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

    def _compress(self, run: RunState, pm: Any) -> dict[str, list[dict[str, Any]]]:
        """Dense evaluations, then pass 1, allocation and pass 2; returns the evaluations so far."""
        recipe, fabric, tokenizer = run.recipe, run.fabric, run.tokenizer
        evaluations: dict[str, list[dict[str, Any]]] = {"dense": [], "compressed": []}
        with self.phase("evaluate dense"):
            evaluations["dense"] = self._dense_evaluations(run)
        with self.phase("calibration data"):
            ids = tokenize(tokenizer, load_text(recipe.calibration.dataset, "calibration",
                                                recipe.calibration.text_field))
            windows = calibration_windows(ids, tokenizer, recipe.calibration.samples, recipe.calibration.seq_len,
                                          recipe.calibration.seed, run.adapter.needs_bos)
            run.calibration = windows[fabric.global_rank :: fabric.world_size]
        run.units = [u for units in pm.hook.lowrank_units(run=run) for u in units]
        if recipe.score:
            with self.phase("score"):
                self._scores(run, pm)
        with self.phase("allocate"):
            run.plan = pm.hook.lowrank_allocate(run=run, units=run.units)
            if run.plan is None:
                raise RuntimeError(f"allocator '{recipe.allocate.plugin}' returned no plan")
        run.store, run.store_base = self.store, json.dumps(self._data_key(run), sort_keys=True, default=str)
        with self.phase("compress"):
            if recipe.calibration.sequential:
                self._compress_pass(run, pm)
            else:
                self._dense_input_pass(run, pm)
        return evaluations

    def _finish(self, run: RunState, pm: Any, evaluations: dict[str, list[dict[str, Any]]],
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
        partial = None
        if fabric.global_rank == 0:
            with self.phase("save"):
                partial = io.write_model(run, out_dir)
        rep = report.build(run, dense_params, io.count_params(model), evaluations, self.timings)
        files = {"generations.jsonl": report.generations_jsonl(evaluations)}
        saved = io.finish(run, partial, out_dir, rep, self.overwrite, files) if partial is not None else None
        self._emit("on_run_end", rep)
        return Result(model=model, tokenizer=run.tokenizer, report=rep, output_dir=saved, run=run,
                      evaluations=evaluations, dense_params=dense_params)

    def _dense_fingerprint(self, run: RunState) -> str:
        """The dense model's identity for cache keys, taken before any layer is compressed."""
        if "fingerprint" not in run.notes:
            run.notes["fingerprint"] = fingerprint(run.model)
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
                        desc=f"{label} {spec.metric}", progress=self.progress, dense=dense)

    def _reduce(self, run: RunState) -> Any:
        if run.fabric.world_size == 1:
            return None
        return lambda t: run.fabric.all_reduce(t, reduce_op="sum")

    def _batches(self, run: RunState) -> Iterator[torch.Tensor]:
        size = run.recipe.calibration.batch_size
        for start in range(0, len(run.calibration), size):
            yield run.calibration[start : start + size].to(run.fabric.device)

    def _scores(self, run: RunState, pm: Any) -> None:
        """Importances from the cache when the same model, data and scorers were seen before."""
        recipe = run.recipe
        cache = Cache(recipe.output.cache_dir)
        key = {
            **self._data_key(run),
            "collect": [c.to_dict() for c in recipe.collect],
            "score": [c.to_dict() for c in recipe.score],
        }
        cached = cache.get("scores", key)
        if cached is not None:
            run.scores.update(cached)
            run.notes["scores"] = {"cached": True}
            return
        self._score_pass(run, pm)
        cache.put("scores", key, run.scores)
        run.notes["scores"] = {"cached": False}

    def _data_key(self, run: RunState) -> dict[str, Any]:
        """What makes two runs' calibration forwards of the dense model identical."""
        return {"model": self._dense_fingerprint(run), "calibration": run.recipe.calibration_data(),
                "world_size": run.fabric.world_size, "precision": run.recipe.runtime.precision}

    def _score_pass(self, run: RunState, pm: Any) -> None:
        """Pass 1 on the dense model: gather whole-model statistics, then importances."""
        tap = Tap()
        pm.hook.lowrank_collect_dense(run=run, tap=tap)
        batches = tqdm(self._batches(run), total=-(-len(run.calibration) // run.recipe.calibration.batch_size),
                       desc="score (forward + backward)" if tap.backward else "score", unit="batch",
                       disable=not self.progress or run.fabric.global_rank != 0, leave=False, file=sys.stderr)
        with _gradients_only_for(run.model, tap.grad_params):
            for batch in batches:
                if tap.backward:
                    # The gradient of the batch's mean loss, accumulated over chunks of windows so
                    # that only one chunk's activations are held for the backward pass.
                    for chunk in batch.split(run.recipe.runtime.backward_chunk):
                        with run.fabric.autocast():
                            loss = run.model(input_ids=chunk, labels=chunk, use_cache=False).loss
                        run.fabric.backward(loss * len(chunk) / len(batch))
                    tap.backward_done()
                    run.model.zero_grad(set_to_none=True)
                else:  # the decoder stack only: statistics never need the vocabulary-sized logits
                    with torch.no_grad(), run.fabric.autocast():
                        run.adapter.decoder(input_ids=batch, use_cache=False)
        run.stats.update(tap.close(self._reduce(run)))
        for scores in pm.hook.lowrank_score(run=run):
            clash = set(scores) & set(run.scores)
            if clash:
                raise RuntimeError(f"two score strategies both scored {sorted(clash)[:3]}")
            run.scores.update(scores)

    def _capture_inputs(self, run: RunState, tap: Tap) -> list[LayerInputs]:
        """The first decoder layer's inputs and keyword arguments for every calibration batch, on the CPU."""
        with tap.paused():  # the recorders pass embeddings through every layer
            inputs = [capture(run.model, run.adapter.layers, batch) for batch in self._batches(run)]
        for item in inputs:
            item.hidden = item.hidden.cpu()  # one layer's activations, off the accelerator
        return inputs

    @staticmethod
    def _forward_layer(run: RunState, index: int, item: LayerInputs) -> torch.Tensor:
        with run.fabric.autocast():
            hidden = LayerInputs(item.hidden.to(run.fabric.device), item.kwargs)
            return run_layer(run.adapter.layers[index], hidden, index)

    @torch.no_grad()
    def _compress_pass(self, run: RunState, pm: Any) -> None:
        """Pass 2: one decoder layer at a time, statistics from compressed predecessors.

        Calibration inputs are replayed lazily: captured at the first layer that collects
        statistics and advanced through the (already compressed) layers only when a later
        layer collects again, so data-free transforms cost no forward passes at all.
        """
        layers = run.adapter.layers
        inputs: list[LayerInputs] | None = None
        depth = 0  # ``inputs`` hold the inputs of layer ``depth``

        for index in range(len(layers)):
            self._emit("on_layer_start", index)
            tap = Tap()
            pm.hook.lowrank_collect_layer(run=run, tap=tap, layer=index)
            if tap.stats:
                if inputs is None:
                    inputs = self._capture_inputs(run, tap)
                for item in inputs:
                    for earlier in range(depth, index):
                        item.hidden = self._forward_layer(run, earlier, item).cpu()
                    self._forward_layer(run, index, item)
                depth = index
            gathered = tap.close(self._reduce(run))
            run.stats.update(gathered)
            pm.hook.lowrank_transform(run=run, layer=index)
            for key in gathered:  # a layer's statistics are not needed once it is compressed
                run.stats.pop(key, None)
            self._emit("on_layer_end", index)

    @torch.no_grad()
    def _dense_input_pass(self, run: RunState, pm: Any) -> None:
        """Pass 2 with statistics of the dense model (``calibration.sequential: false``).

        Each layer runs once, still dense, just before it is transformed, so its outputs are the
        dense model's and feed the next layer. Statistics found in the DenseStore (a bench's
        earlier ratio or recipe on the same model and data) cost no forward: layers run only up
        to the last one with a statistic missing.
        """
        layers = run.adapter.layers
        store, base = run.store, run.store_base

        def stored(tap: Tap) -> dict[str, Any] | None:
            if store is None:
                return None if tap.stats else {}
            found = {key: store.get(base, statistic_identity(key, stat)) for key, stat in tap.stats.items()}
            return None if any(stat is None for stat in found.values()) else found

        last_missing = -1
        for index in range(len(layers)):  # a dry run of the taps: which layers must run?
            tap = Tap()
            pm.hook.lowrank_collect_layer(run=run, tap=tap, layer=index)
            tap.close()
            if stored(tap) is None:
                last_missing = index
        inputs: list[LayerInputs] | None = None
        for index in range(len(layers)):
            self._emit("on_layer_start", index)
            tap = Tap()
            pm.hook.lowrank_collect_layer(run=run, tap=tap, layer=index)
            found = stored(tap)
            if index <= last_missing:
                if inputs is None:
                    inputs = self._capture_inputs(run, tap)
                with tap.paused() if found is not None else contextlib.nullcontext():
                    for item in inputs:
                        item.hidden = self._forward_layer(run, index, item).cpu()
            if found is None:
                found = tap.close(self._reduce(run))
                for key, stat in found.items():
                    if store is not None:
                        store.put(base, statistic_identity(key, stat), stat)
            else:
                tap.close()
            run.stats.update(found)
            pm.hook.lowrank_transform(run=run, layer=index)
            for key in found:
                run.stats.pop(key, None)
            self._emit("on_layer_end", index)


@contextlib.contextmanager
def _gradients_only_for(model: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Compute only the weight gradients a statistic reads (not e.g. the embedding's)."""
    if not params:
        yield
        return
    wanted = {id(p) for p in params}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])


def same_compression(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes compress identically (they may differ in decode, name and output)."""
    first, second = a.to_dict(), b.to_dict()
    return all(first[k] == second[k] for k in first if k not in ("name", "decode", "output"))
