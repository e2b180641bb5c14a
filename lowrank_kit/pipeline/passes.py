"""The calibration passes of a run, as named parts the engine calls in order.

- ``ScoringPass``: the dense model over the calibration batches (a backward pass per batch
  when a statistic reads gradients; none when a bench's store holds every statistic asked
  for), then ``lowrank_score``.
- ``SequentialPass`` (``calibration.pipeline: sequential``): layer by layer, statistics on
  inputs produced by the already compressed earlier layers (FLAT-LLM's order).
- ``DenseInputPass`` (``dense_input``): layer by layer, statistics on the dense model's
  activations (SVD-LLM's and ASVD's whitening); a bench shares them across ratios and recipes.
- ``ErrorCurvePass``: before allocating, for allocators that plan from truncation errors:
  layer by layer on the dense model, every unit's error at every rank (nothing transformed).
- ``LayerLossPass``: between allocations, for allocators that refine their plan by
  measurement: the loss increase of each decoder layer compressed alone at the current plan.

Both layer passes share one loop (``LayerPass.run``: collect → gather → transform → drop →
checkpoint, with ``on_layer_start``/``on_layer_end`` around each layer) and differ only in
``gather``, which forwards feed a layer's statistics, and ``skip``, what a layer restored
from a resumed run's checkpoint still has to do for the layers after it. A new pass is a
subclass with a ``gather`` and a line in ``LAYER_PASSES`` (and the recipe's ``pipeline`` choices).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import pluggy
import torch
from torch import nn

from lowrank_kit.calibration.stats import Statistic, Tap
from lowrank_kit.compressed.plan import RankPlan
from lowrank_kit.extension.keys import is_layer_statistic
from lowrank_kit.persistence.checkpoint import Checkpoints
from lowrank_kit.pipeline.cache import statistic_identity
from lowrank_kit.pipeline.replay import LayerInputs, Spill, capture, run_layer
from lowrank_kit.pipeline.state import RunState
from lowrank_kit.reporting.progress import Progress


@dataclass
class PassContext:
    """What a pass needs besides the run state: the run's hooks, callback events, batches."""

    run: RunState
    pm: pluggy.PluginManager
    emit: Callable[..., None]
    progress: Progress
    checkpoints: Checkpoints | None = None  # finished layers of a resumed run; where each new one is recorded

    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sum across processes (data-parallel calibration), or None on one process."""
        fabric = self.run.fabric
        return None if fabric.world_size == 1 else (lambda t: fabric.all_reduce(t, reduce_op="sum"))

    def batches(self) -> Iterator[torch.Tensor]:
        run = self.run
        size = run.recipe.calibration.batch_size
        for start in range(0, len(run.calibration), size):
            yield run.calibration[start : start + size].to(run.fabric.device)

    @property
    def batch_count(self) -> int:
        return -(-len(self.run.calibration) // self.run.recipe.calibration.batch_size)


class ScoringPass:
    """Pass 1 on the dense model: gather whole-model statistics, then importances.

    With ``transforms_only`` (the scores are cached) only the statistics transforms read are
    gathered, and nothing is scored: no scorer's gradients are taken again. The transforms'
    statistics (e.g. output Fishers) depend only on the dense model and data, so a bench's
    DenseStore keeps them: a later cell whose scores are cached then runs no pass at all."""

    def __init__(self, transforms_only: bool = False):
        self.transforms_only = transforms_only

    def _collect(self, ctx: PassContext, tap: Tap) -> set[str]:
        """Attach the pass's statistics to ``tap``; the keys the transforms asked for."""
        plugins = ctx.pm.get_plugins()
        transforms = [s for s in plugins if getattr(s, "point", None) == "transform"]
        others = [s for s in plugins if getattr(s, "point", None) != "transform"]
        ctx.pm.subset_hook_caller("lowrank_collect_dense", remove_plugins=others)(run=ctx.run, tap=tap)
        keys = set(tap.stats)
        if not self.transforms_only:
            ctx.pm.subset_hook_caller("lowrank_collect_dense", remove_plugins=transforms)(run=ctx.run, tap=tap)
        return keys

    def _identity(self, ctx: PassContext, key: str, stat: Statistic) -> str:
        # Backward chunks change only the rounding of a gradient sum, but stored means bit-identical.
        return f"scoring|{statistic_identity(key, stat)}|chunk={ctx.run.recipe.runtime.backward_chunk}"

    def _stored(self, ctx: PassContext, tap: Tap) -> dict[str, Statistic] | None:
        """Every statistic ``tap`` asks for, from the store; None when one is missing (or when a
        strategy reads gradients after each backward pass, which only the pass itself can serve)."""
        store, base = ctx.run.store, ctx.run.store_base
        if store is None or not tap.stats or tap.has_backward_callbacks:
            return None
        found = {key: store.get(base, self._identity(ctx, key, stat)) for key, stat in tap.stats.items()}
        return None if any(stat is None for stat in found.values()) else found

    def run(self, ctx: PassContext) -> None:
        run = ctx.run
        tap = Tap()
        transform_keys = self._collect(ctx, tap)
        if self.transforms_only and not tap.stats and not tap.backward:
            return  # nothing to gather (e.g. a weighting the recipe's allocator ignores): no forward pass
        found = self._stored(ctx, tap)
        if found is not None:  # every statistic asked for is a transform's, stored by an earlier cell
            tap.close()
            run.stats.update(found)
        else:
            self._gather(ctx, tap, transform_keys)
        if self.transforms_only:
            return
        for scores in ctx.pm.hook.lowrank_score(run=run):
            clash = set(scores) & set(run.scores)
            if clash:
                raise RuntimeError(f"two score strategies both scored {sorted(clash)[:3]}")
            run.scores.update(scores)

    def _gather(self, ctx: PassContext, tap: Tap, transform_keys: set[str]) -> None:
        """The dense model over the calibration batches (and a backward pass per batch if asked)."""
        run = ctx.run
        label = "score (forward + backward)" if tap.backward else "score"
        resident = contextlib.ExitStack()
        if tap.backward and run.offload is not None and run.offload.active:
            # A backward pass needs every layer's weights at once, and the statistics must watch the
            # parameters those layers hold while in (not the placeholders of offloaded ones).
            tap.close()
            resident.enter_context(run.offload.everything())
            tap = Tap()
            self._collect(ctx, tap)
        # Identities as the lookup takes them, from the unfilled statistics: settings that change
        # while a statistic fills (GradEnergy's width) must not make a later cell miss it.
        identities = {key: self._identity(ctx, key, tap.stats[key]) for key in transform_keys}
        with resident, _gradients_only_for(run.model, tap.grad_params, tap.activation_grads):
            for batch in ctx.progress(ctx.batches(), ctx.batch_count, label):
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
        gathered = tap.close(ctx.reduce())
        run.stats.update(gathered)
        if run.store is not None:
            for key, identity in identities.items():
                if run.store.get(run.store_base, identity) is None:
                    run.store.put(run.store_base, identity, gathered[key])


class LayerPass:
    """Pass 2: every decoder layer collects, gathers its statistics, is transformed, in order."""

    name: ClassVar[str]
    # Whether its statistics are the dense model's, so results computed from them can be shared
    # with other runs on the same dense model and data (a bench's DenseStore).
    dense_statistics: ClassVar[bool]

    def __init__(self, ctx: PassContext):
        self.ctx = ctx
        self.inputs: list[LayerInputs] | None = None  # calibration batches at the current depth, on the CPU
        run = ctx.run
        folder = run.offload.folder / "inputs" if run.offload is not None and run.offload.folder else None
        self.spill = Spill(folder, run.recipe.runtime.inputs_memory_mb)

    @torch.no_grad()
    def run(self) -> None:
        ctx, run = self.ctx, self.ctx.run
        self.prepare()
        checkpoints = ctx.checkpoints
        for index in range(len(run.adapter.layers)):
            ctx.emit("on_layer_start", index)
            if checkpoints is not None and checkpoints.has(index):
                self.skip(index)
                with run.layer_in(index, changed=True):
                    checkpoints.restore_layer(run, index)
                _drop_layer_statistics(run, index)
                ctx.emit("on_layer_end", index)
                continue
            with run.layer_in(index, changed=True):
                tap = self.collect(index)
                gathered = self.gather(index, tap)
                _check_finite(run, index, gathered)
                run.stats.update(gathered)
                ctx.pm.hook.lowrank_transform(run=run, layer=index)
                _drop_layer_statistics(run, index)
                if checkpoints is not None:
                    checkpoints.save_layer(run, index)
            ctx.emit("on_layer_end", index)
        self.spill.close()
        if self.spill.written:
            run.notes["inputs_spilled_mb"] = round(self.spill.written / 2**20, 1)

    def restored(self, index: int) -> bool:
        return self.ctx.checkpoints is not None and self.ctx.checkpoints.has(index)

    def prepare(self) -> None:
        """Work before the first layer (none by default)."""

    def skip(self, index: int) -> None:
        """Layer ``index`` comes from a checkpoint; do what the layers after it need (nothing by
        default). Called while the layer is still dense, just before it is restored."""

    def collect(self, index: int) -> Tap:
        tap = Tap()
        self.ctx.pm.hook.lowrank_collect_layer(run=self.ctx.run, tap=tap, layer=index)
        return tap

    def gather(self, index: int, tap: Tap) -> dict[str, Statistic]:
        """Run the forwards that fill ``tap`` for layer ``index``; return its closed statistics."""
        raise NotImplementedError

    def capture_inputs(self, tap: Tap) -> list[LayerInputs]:
        """The first decoder layer's inputs and keyword arguments for every calibration batch, on the CPU."""
        run = self.ctx.run
        skip = run.offload.bypass() if run.offload else contextlib.nullcontext()
        with tap.paused(), skip:  # the recorders pass embeddings through every layer (weights unused)
            inputs = [capture(run.model, run.adapter.layers, batch) for batch in self.ctx.batches()]
        self.spill.decide(len(inputs), inputs[0].hidden)
        for slot, item in enumerate(inputs):
            item.hidden = self.spill.keep(slot, item.hidden)  # one layer's activations, off the accelerator
        return inputs

    def advance_dense(self, index: int) -> dict[str, Statistic]:
        """Layer ``index``'s statistics from the calibration inputs, which then move on through it,
        still dense (the planning passes, which read the dense model's activations at every layer)."""
        run, tap = self.ctx.run, self.collect(index)
        if self.inputs is None:
            self.inputs = self.capture_inputs(tap)
        self.advance(index)
        gathered = tap.close(self.ctx.reduce())
        _check_finite(run, index, gathered)
        run.stats.update(gathered)
        return gathered

    def advance(self, index: int) -> None:
        """Move every calibration batch's activations on through layer ``index``."""
        assert self.inputs is not None
        with self.ctx.run.layer_in(index):
            for slot, item in enumerate(self.inputs):
                item.hidden = self.spill.keep(slot, self.forward_layer(index, item))

    def forward_layer(self, index: int, item: LayerInputs) -> torch.Tensor:
        run = self.ctx.run
        with run.fabric.autocast():
            hidden = LayerInputs(item.hidden.to(run.fabric.device), item.kwargs)
            return run_layer(run.adapter.layers[index], hidden, index)


class SequentialPass(LayerPass):
    """Statistics from compressed predecessors.

    Calibration inputs are replayed lazily: captured at the first layer that collects
    statistics and advanced through the (already compressed) layers only when a later layer
    collects again, so data-free transforms cost no forward passes at all.
    """

    name = "sequential"
    dense_statistics = False

    def __init__(self, ctx: PassContext):
        super().__init__(ctx)
        self.depth = 0  # ``inputs`` hold the inputs of layer ``depth``

    def gather(self, index: int, tap: Tap) -> dict[str, Statistic]:
        if tap.stats:
            if self.inputs is None:
                self.inputs = self.capture_inputs(tap)
            for earlier in range(self.depth, index):  # layer by layer: an offloaded one is read once
                self.advance(earlier)
            for item in self.inputs:
                # The dense layer's outputs are not used (the compressed layer's feed the next one):
                # it runs only until its statistics are fed (e.g. a down_proj read at its input is skipped).
                with tap.until_filled():
                    self.forward_layer(index, item)
            self.depth = index
        return tap.close(self.ctx.reduce())


class DenseInputPass(LayerPass):
    """Statistics of the dense model.

    Each layer runs once, still dense, just before it is transformed, so its outputs are the
    dense model's and feed the next layer. Statistics found in the DenseStore (a bench's
    earlier ratio or recipe on the same model and data) cost no forward: layers run only up to
    the last one with a statistic missing, found by asking every layer's collect hook first.
    """

    name = "dense_input"
    dense_statistics = True

    def stored(self, tap: Tap) -> dict[str, Statistic] | None:
        """The statistics ``tap`` asks for, all from the store; None when any is missing."""
        run = self.ctx.run
        if run.store is None:
            return None if tap.stats else {}
        found = {key: run.store.get(run.store_base, statistic_identity(key, stat)) for key, stat in tap.stats.items()}
        return None if any(stat is None for stat in found.values()) else found

    def prepare(self) -> None:
        self.last_missing = -1
        for index in range(len(self.ctx.run.adapter.layers)):
            if self.restored(index):
                continue
            tap = self.collect(index)
            tap.close()
            if self.stored(tap) is None:
                self.last_missing = index

    def skip(self, index: int) -> None:
        """A later layer still needs the dense model's activations: run this one, still dense."""
        if index < self.last_missing:
            if self.inputs is None:
                self.inputs = self.capture_inputs(Tap())
            self.advance(index)

    def gather(self, index: int, tap: Tap) -> dict[str, Statistic]:
        run = self.ctx.run
        found = self.stored(tap)
        identities = {key: statistic_identity(key, stat) for key, stat in tap.stats.items()}  # unfilled, as looked up
        if index <= self.last_missing:
            if self.inputs is None:
                self.inputs = self.capture_inputs(tap)
            with tap.paused() if found is not None else contextlib.nullcontext():
                self.advance(index)
        if found is not None:
            tap.close()
            return found
        found = tap.close(self.ctx.reduce())
        if run.store is not None:
            for key, stat in found.items():
                run.store.put(run.store_base, identities[key], stat)
        return found


class ErrorCurvePass(LayerPass):
    """Before allocating: every unit's truncation-error curve, measured on the dense model.

    Layer by layer like ``DenseInputPass`` (dense activations, each layer's statistics dropped
    once its curves are taken, so memory stays at one layer's statistics plus the curves), but
    nothing is transformed: the plan is a probe keeping every unit at rank 0, so every
    transform collects what it needs for every unit, and ``lowrank_error_curves`` reads them.
    """

    name = "error_curves"
    dense_statistics = True

    @torch.no_grad()
    def run(self) -> None:
        ctx, run = self.ctx, self.ctx.run
        plan, dense_statistics = run.plan, run.dense_statistics
        run.plan = RankPlan(ranks={u.name: 0 for u in run.units}, allocator="probe")
        run.planning, run.dense_statistics = True, True
        try:
            layers = len(run.adapter.layers)
            for index in ctx.progress(range(layers), layers, "error curves"):
                with run.layer_in(index):
                    gathered = self.advance_dense(index)
                    for curves in ctx.pm.hook.lowrank_error_curves(run=run, layer=index):
                        run.error_curves.update({curve.unit: curve for curve in curves})
                for key in gathered:
                    run.stats.pop(key, None)
        finally:
            run.plan, run.planning, run.dense_statistics = plan, False, dense_statistics
            self.spill.close()


class LayerLossPass(LayerPass):
    """The measured loss increase of compressing each decoder layer alone at the current plan.

    Layer by layer on the dense model like ``ErrorCurvePass``: the layer's statistics are taken
    on the calibration batches' dense inputs, its units are transformed at the plan's ranks,
    ``windows`` (held-out windows of the calibration text) run from the compressed layer
    through the dense layers after it to the loss, and the dense layer is put back before both
    sets of activations move on, dense. Costs the transforms' work once (as a dense-input
    compress) plus about L/2 forwards of the measured windows. The run's notes are restored,
    so the report describes only the real pass.
    """

    name = "layer_loss"
    dense_statistics = True

    def __init__(self, ctx: PassContext, windows: torch.Tensor):
        super().__init__(ctx)
        size = ctx.run.recipe.calibration.batch_size
        self.ids = [windows[i : i + size].to(ctx.run.fabric.device) for i in range(0, len(windows), size)]

    def _loss(self, start: int, hidden: list[torch.Tensor], measured: list[LayerInputs]) -> float:
        """Mean loss of the measured windows whose layer-``start`` outputs are ``hidden``."""
        run = self.ctx.run
        total = torch.zeros(2, dtype=torch.float64)
        for item, h, batch in zip(measured, hidden, self.ids, strict=True):
            for later in range(start + 1, len(run.adapter.layers)):
                h = self.forward_layer(later, LayerInputs(h, item.kwargs))
            with run.fabric.autocast():
                loss = run.adapter.next_token_loss(h.to(run.fabric.device), batch)
            total += torch.tensor([float(loss) * len(batch), len(batch)], dtype=torch.float64)
        reduce = self.ctx.reduce()
        total = reduce(total.to(run.fabric.device)).cpu() if reduce else total
        return float(total[0] / total[1])

    @torch.no_grad()
    def run(self) -> dict[int, float]:  # type: ignore[override]
        ctx, run = self.ctx, self.ctx.run
        notes, dense_statistics = copy.deepcopy(run.notes), run.dense_statistics
        run.dense_statistics = True
        measured_inputs = [capture(run.model, run.adapter.layers, batch) for batch in self.ids]
        for item in measured_inputs:
            item.hidden = item.hidden.cpu()
        base = self._loss(-1, [item.hidden for item in measured_inputs], measured_inputs)
        losses: dict[int, float] = {}
        try:
            layers = len(run.adapter.layers)
            for index in ctx.progress(range(layers), layers, "refine plan (measured layer loss)"):
                gathered = self.advance_dense(index)
                dense_layer = copy.deepcopy(run.adapter.layers[index])
                try:
                    ctx.pm.hook.lowrank_transform(run=run, layer=index)
                    compressed = [self.forward_layer(index, item) for item in measured_inputs]
                    losses[index] = self._loss(index, compressed, measured_inputs) - base
                finally:
                    run.adapter.layers[index] = dense_layer
                for key in gathered:
                    run.stats.pop(key, None)
                for item in measured_inputs:
                    item.hidden = self.forward_layer(index, item).cpu()
        finally:
            run.notes, run.dense_statistics = notes, dense_statistics
        return losses


# calibration.pipeline → the layer pass it names (recipe.spec's DataSpec lists the same names).
LAYER_PASSES: dict[str, type[LayerPass]] = {cls.name: cls for cls in (SequentialPass, DenseInputPass)}


def _drop_layer_statistics(run: RunState, index: int) -> None:
    """Free every statistic of layer ``index`` once the layer is compressed (or restored): the ones
    this pass gathered for it, and the scoring pass's (an output Fisher, d_out² per projection),
    whose scores are computed and whose transforms have read them."""
    for key in [k for k in run.stats if is_layer_statistic(k, index)]:
        del run.stats[key]


def _check_finite(run: RunState, index: int, stats: dict[str, Statistic]) -> None:
    """Name the layer and module before a decomposition trips over a NaN or an infinity."""
    for name, param in run.adapter.layers[index].named_parameters():
        if not torch.isfinite(param).all():
            raise ValueError(f"decoder layer {index}: weight '{name}' holds NaN or infinite values; the "
                             "checkpoint is damaged or was loaded in a dtype too narrow for it")
    for key, stat in stats.items():
        if any(not torch.isfinite(t).all() for t in stat.sums().values()):
            raise ValueError(f"decoder layer {index}: statistic '{key}' holds NaN or infinite values "
                             "(activations overflowed; try runtime.precision: 32-true)")


@contextlib.contextmanager
def _gradients_only_for(model: nn.Module, params: list[nn.Parameter], activations: bool = False) -> Iterator[None]:
    """Compute only the weight gradients a statistic reads (not e.g. the embedding's).

    ``activations``: a statistic reads gradients of module outputs; with no weight gradient
    wanted, the embedding's output is made to require a gradient so the backward pass reaches
    every layer without computing any weight gradient.
    """
    if not params and not activations:
        yield
        return
    wanted = {id(p) for p in params}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    handle = None
    if activations and not params:
        handle = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_())
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])
